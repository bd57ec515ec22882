package bench

import (
	"math"
	"slices"
)

// Percentiles are the percentiles every summary reports (p50, p90, p99).
var Percentiles = []float64{50, 90, 99}

// Summary is a run's aggregate, with the field names of vLLM's benchmark_serving result
// JSON: throughputs per second of Duration, and latency statistics in milliseconds over the
// successful requests (TTFT, TPOT and ITL over the streamed ones only).
type Summary struct {
	// Duration is the wall time of the run in seconds.
	Duration             float64 `json:"duration"`
	Completed            int     `json:"completed"`
	Failed               int     `json:"failed"`
	TotalInputTokens     int     `json:"total_input_tokens"`
	TotalOutputTokens    int     `json:"total_output_tokens"`
	RequestThroughput    float64 `json:"request_throughput"`
	OutputThroughput     float64 `json:"output_throughput"`
	TotalTokenThroughput float64 `json:"total_token_throughput"`
	// MaxOutputTokensPerS is the most content tokens seen in one second of the run, and
	// MaxConcurrentRequests the most requests active in one second (vLLM's definitions;
	// streamed requests only for the former, one token per content chunk).
	MaxOutputTokensPerS   float64 `json:"max_output_tokens_per_s"`
	MaxConcurrentRequests int     `json:"max_concurrent_requests"`

	MeanTTFTMs   float64 `json:"mean_ttft_ms"`
	MedianTTFTMs float64 `json:"median_ttft_ms"`
	StdTTFTMs    float64 `json:"std_ttft_ms"`
	P50TTFTMs    float64 `json:"p50_ttft_ms"`
	P90TTFTMs    float64 `json:"p90_ttft_ms"`
	P99TTFTMs    float64 `json:"p99_ttft_ms"`

	MeanTPOTMs   float64 `json:"mean_tpot_ms"`
	MedianTPOTMs float64 `json:"median_tpot_ms"`
	StdTPOTMs    float64 `json:"std_tpot_ms"`
	P50TPOTMs    float64 `json:"p50_tpot_ms"`
	P90TPOTMs    float64 `json:"p90_tpot_ms"`
	P99TPOTMs    float64 `json:"p99_tpot_ms"`

	MeanITLMs   float64 `json:"mean_itl_ms"`
	MedianITLMs float64 `json:"median_itl_ms"`
	StdITLMs    float64 `json:"std_itl_ms"`
	P50ITLMs    float64 `json:"p50_itl_ms"`
	P90ITLMs    float64 `json:"p90_itl_ms"`
	P99ITLMs    float64 `json:"p99_itl_ms"`

	MeanE2ELMs   float64 `json:"mean_e2el_ms"`
	MedianE2ELMs float64 `json:"median_e2el_ms"`
	StdE2ELMs    float64 `json:"std_e2el_ms"`
	P50E2ELMs    float64 `json:"p50_e2el_ms"`
	P90E2ELMs    float64 `json:"p90_e2el_ms"`
	P99E2ELMs    float64 `json:"p99_e2el_ms"`

	// MeanTokensPerS is the mean over successful requests of output tokens ÷ E2EL.
	MeanTokensPerS float64 `json:"mean_tokens_per_s"`
	// TotalChunks and TotalContentChunks add up the requests' chunk counts.
	TotalChunks        int `json:"total_chunks"`
	TotalContentChunks int `json:"total_content_chunks"`
	// FinishReasons counts the successful requests by finish_reason.
	FinishReasons map[string]int `json:"finish_reasons"`
	// Errors counts the failed requests by error message.
	Errors map[string]int `json:"errors"`
}

// Dist is the statistics of one metric, in the unit of its samples.
type Dist struct {
	Mean, Median, Std, P50, P90, P99 float64
}

// Distribution computes mean, median, population standard deviation and p50/p90/p99 with
// linear interpolation between closest ranks (numpy's defaults, as vLLM uses). No samples
// give zeros.
func Distribution(xs []float64) Dist {
	if len(xs) == 0 {
		return Dist{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	mean := sum / float64(len(s))
	var sq float64
	for _, x := range s {
		sq += (x - mean) * (x - mean)
	}
	return Dist{
		Mean:   mean,
		Median: Percentile(s, 50),
		Std:    math.Sqrt(sq / float64(len(s))),
		P50:    Percentile(s, 50),
		P90:    Percentile(s, 90),
		P99:    Percentile(s, 99),
	}
}

// Percentile returns the p-th percentile (0–100) of sorted samples, interpolating linearly
// between the closest ranks (numpy.percentile's default method).
func Percentile(sorted []float64, p float64) float64 {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	rank := p / 100 * float64(n-1)
	lo := int(math.Floor(rank))
	hi := int(math.Ceil(rank))
	if hi >= n {
		return sorted[n-1]
	}
	return sorted[lo] + (sorted[hi]-sorted[lo])*(rank-float64(lo))
}

// ms scales a distribution in seconds to milliseconds.
func (d Dist) ms() Dist {
	return Dist{d.Mean * 1000, d.Median * 1000, d.Std * 1000, d.P50 * 1000, d.P90 * 1000, d.P99 * 1000}
}

// TTFT, TPOT, ITL and E2EL return the summary's distributions in milliseconds.
func (s Summary) TTFT() Dist {
	return Dist{s.MeanTTFTMs, s.MedianTTFTMs, s.StdTTFTMs, s.P50TTFTMs, s.P90TTFTMs, s.P99TTFTMs}
}

// TPOT returns the time-per-output-token distribution in milliseconds.
func (s Summary) TPOT() Dist {
	return Dist{s.MeanTPOTMs, s.MedianTPOTMs, s.StdTPOTMs, s.P50TPOTMs, s.P90TPOTMs, s.P99TPOTMs}
}

// ITL returns the inter-token latency distribution in milliseconds.
func (s Summary) ITL() Dist {
	return Dist{s.MeanITLMs, s.MedianITLMs, s.StdITLMs, s.P50ITLMs, s.P90ITLMs, s.P99ITLMs}
}

// E2EL returns the end-to-end latency distribution in milliseconds.
func (s Summary) E2EL() Dist {
	return Dist{s.MeanE2ELMs, s.MedianE2ELMs, s.StdE2ELMs, s.P50E2ELMs, s.P90E2ELMs, s.P99E2ELMs}
}

// Summarize aggregates results over a run that lasted duration seconds, as vLLM's
// calculate_metrics does: failed requests count only in Failed and Errors.
func Summarize(results []Result, duration float64) Summary {
	s := Summary{Duration: duration, FinishReasons: map[string]int{}, Errors: map[string]int{}}
	var ttfts, tpots, itls, e2els, tps []float64
	for _, r := range results {
		s.TotalChunks += r.Chunks
		s.TotalContentChunks += r.ContentChunks
		if !r.Success {
			s.Failed++
			s.Errors[r.Error]++
			continue
		}
		s.Completed++
		s.TotalInputTokens += r.PromptTokens
		s.TotalOutputTokens += r.OutputTokens
		s.FinishReasons[r.FinishReason]++
		e2els = append(e2els, r.E2EL)
		tps = append(tps, r.TokensPerS)
		if !r.Stream {
			continue
		}
		ttfts = append(ttfts, r.TTFT)
		itls = append(itls, r.ITL...)
		if r.OutputTokens > 1 {
			tpots = append(tpots, r.TPOT)
		}
	}
	if duration > 0 {
		s.RequestThroughput = float64(s.Completed) / duration
		s.OutputThroughput = float64(s.TotalOutputTokens) / duration
		s.TotalTokenThroughput = float64(s.TotalInputTokens+s.TotalOutputTokens) / duration
	}
	s.MaxOutputTokensPerS, s.MaxConcurrentRequests = peaks(results)
	t := Distribution(ttfts).ms()
	s.MeanTTFTMs, s.MedianTTFTMs, s.StdTTFTMs, s.P50TTFTMs, s.P90TTFTMs, s.P99TTFTMs = t.Mean, t.Median, t.Std, t.P50, t.P90, t.P99
	t = Distribution(tpots).ms()
	s.MeanTPOTMs, s.MedianTPOTMs, s.StdTPOTMs, s.P50TPOTMs, s.P90TPOTMs, s.P99TPOTMs = t.Mean, t.Median, t.Std, t.P50, t.P90, t.P99
	t = Distribution(itls).ms()
	s.MeanITLMs, s.MedianITLMs, s.StdITLMs, s.P50ITLMs, s.P90ITLMs, s.P99ITLMs = t.Mean, t.Median, t.Std, t.P50, t.P90, t.P99
	t = Distribution(e2els).ms()
	s.MeanE2ELMs, s.MedianE2ELMs, s.StdE2ELMs, s.P50E2ELMs, s.P90E2ELMs, s.P99E2ELMs = t.Mean, t.Median, t.Std, t.P50, t.P90, t.P99
	s.MeanTokensPerS = Distribution(tps).Mean
	return s
}

// peaks buckets the successful requests' content chunks and activity into one-second bins
// from the first start, as vLLM does, and returns the fullest bins.
func peaks(results []Result) (maxTokens float64, maxConcurrent int) {
	first, last := math.Inf(1), math.Inf(-1)
	for _, r := range results {
		if r.Success {
			first = min(first, r.StartTime)
			last = max(last, r.StartTime+r.E2EL)
		}
	}
	if math.IsInf(first, 1) {
		return 0, 0
	}
	n := int(math.Ceil(last-first)) + 1
	tokens := make([]float64, n)
	active := make([]int, n)
	for _, r := range results {
		if !r.Success {
			continue
		}
		if r.Stream && r.ContentChunks > 0 {
			at := r.StartTime + r.TTFT
			times := []float64{at}
			for _, gap := range r.ITL {
				at += gap
				times = append(times, at)
			}
			for _, t := range times {
				if b := int(t - first); b >= 0 && b < n {
					tokens[b]++
				}
			}
		}
		for b := int(r.StartTime - first); b <= int(r.StartTime+r.E2EL-first) && b < n; b++ {
			active[b]++
		}
	}
	return slices.Max(tokens), slices.Max(active)
}
