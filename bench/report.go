package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// Report is one govllm bench run: the target and every scenario's result. Its JSON field
// names are stable (README: "govllm bench --json").
type Report struct {
	Tool    string `json:"tool"`
	Version string `json:"version"`
	// Server is the registry name benched, if any.
	Server    string           `json:"server,omitempty"`
	URL       string           `json:"url"`
	Model     string           `json:"model"`
	Date      string           `json:"date"`
	OK        bool             `json:"ok"`
	Scenarios []ScenarioResult `json:"scenarios"`
}

// WriteJSON writes the report as one indented JSON document.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("bench: write JSON report: %w", err)
	}
	return nil
}

// maxRows is how many requests a scenario lists in the text report unless verbose.
const maxRows = 20

// WriteText writes the human report: per scenario a table of its requests (all of them when
// verbose, else up to maxRows and the failures), the summary and the checks.
func (r *Report) WriteText(w io.Writer, verbose bool) error {
	ew := &errWriter{w: w}
	name := r.URL
	if r.Server != "" {
		name = r.Server + " (" + r.URL + ")"
	}
	fmt.Fprintf(ew, "govllm bench: %s, model %s\n", name, r.Model)
	var failed []string
	for i := range r.Scenarios {
		sc := &r.Scenarios[i]
		fmt.Fprintln(ew)
		writeScenario(ew, sc, verbose)
		if !sc.OK {
			failed = append(failed, sc.Scenario)
		}
	}
	fmt.Fprintln(ew)
	if len(failed) == 0 {
		fmt.Fprintf(ew, "PASS: %d scenarios\n", len(r.Scenarios))
	} else {
		fmt.Fprintf(ew, "FAIL: %d of %d scenarios failed: %s\n", len(failed), len(r.Scenarios), strings.Join(failed, ", "))
	}
	return ew.err
}

func writeScenario(w io.Writer, sc *ScenarioResult, verbose bool) {
	verdict := "PASS"
	if !sc.OK {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, "=== %s: %s [%s]\n", sc.Scenario, sc.Description, verdict)
	rows := sc.Requests
	hidden := 0
	if !verbose && len(rows) > maxRows {
		keep := slices.Clone(rows[:maxRows])
		for _, r := range rows[maxRows:] {
			if !r.Success {
				keep = append(keep, r)
			}
		}
		hidden = len(rows) - len(keep)
		rows = keep
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "#\tREQUEST\tTTFT ms\tITL ms\tTPOT ms\tE2EL ms\tIN TOK\tOUT TOK\tTOK/S\tCHUNKS\tFINISH\t")
	for _, r := range rows {
		label := r.Label
		if label == "" {
			label = "non-stream"
			if r.Stream {
				label = "stream"
			}
		}
		finish := r.FinishReason
		if !r.Success {
			finish = "ERROR"
		}
		ttft, itl, tpot, chunks := "-", "-", "-", "-"
		if r.Stream {
			ttft = fmt.Sprintf("%.1f", r.TTFT*1000)
			if len(r.ITL) > 0 {
				itl = fmt.Sprintf("%.1f", Distribution(r.ITL).Mean*1000)
			}
			if r.OutputTokens > 1 {
				tpot = fmt.Sprintf("%.1f", r.TPOT*1000)
			}
			chunks = fmt.Sprintf("%d/%d", r.ContentChunks, r.Chunks)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%.1f\t%d\t%d\t%.1f\t%s\t%s\t\n",
			r.Index, label, ttft, itl, tpot, r.E2EL*1000, r.PromptTokens, r.OutputTokens, r.TokensPerS, chunks, finish)
	}
	_ = tw.Flush()
	if hidden > 0 {
		fmt.Fprintf(w, "(%d more successful requests; --verbose lists them)\n", hidden)
	}
	for _, r := range rows {
		if !r.Success {
			fmt.Fprintf(w, "request %d failed: %s\n", r.Index, r.Error)
		}
	}
	writeSummary(w, &sc.Summary)
	for _, c := range sc.Checks {
		mark := "ok  "
		switch {
		case !c.OK && c.Advisory:
			mark = "note"
		case !c.OK:
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %s: %s\n", mark, c.Name, c.Detail)
	}
}

// writeSummary writes a summary in the layout of vLLM's benchmark_serving.
func writeSummary(w io.Writer, s *Summary) {
	fmt.Fprintf(w, "%-40s %d\n", "Successful requests:", s.Completed)
	fmt.Fprintf(w, "%-40s %d\n", "Failed requests:", s.Failed)
	fmt.Fprintf(w, "%-40s %.2f\n", "Benchmark duration (s):", s.Duration)
	fmt.Fprintf(w, "%-40s %d\n", "Total input tokens:", s.TotalInputTokens)
	fmt.Fprintf(w, "%-40s %d\n", "Total generated tokens:", s.TotalOutputTokens)
	fmt.Fprintf(w, "%-40s %.2f\n", "Request throughput (req/s):", s.RequestThroughput)
	fmt.Fprintf(w, "%-40s %.2f\n", "Output token throughput (tok/s):", s.OutputThroughput)
	fmt.Fprintf(w, "%-40s %.2f\n", "Total token throughput (tok/s):", s.TotalTokenThroughput)
	fmt.Fprintf(w, "%-40s %d/%d\n", "Chunks (content/all):", s.TotalContentChunks, s.TotalChunks)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\tmean\tmedian\tstd\tp50\tp90\tp99\t")
	for _, m := range []struct {
		name string
		d    Dist
	}{{"TTFT (ms)", s.TTFT()}, {"TPOT (ms)", s.TPOT()}, {"ITL (ms)", s.ITL()}, {"E2EL (ms)", s.E2EL()}} {
		if m.d == (Dist{}) { // no samples (unstreamed requests have no TTFT, TPOT or ITL)
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t\n", m.name)
			continue
		}
		fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t\n", m.name, m.d.Mean, m.d.Median, m.d.Std, m.d.P50, m.d.P90, m.d.P99)
	}
	_ = tw.Flush()
	if len(s.FinishReasons) > 0 {
		fmt.Fprintf(w, "finish reasons: %s\n", counts(s.FinishReasons))
	}
	if len(s.Errors) > 0 {
		fmt.Fprintf(w, "errors: %s\n", counts(s.Errors))
	}
}

func counts(m map[string]int) string {
	keys := slices.Sorted(maps.Keys(m))
	parts := make([]string, len(keys))
	for i, k := range keys {
		if k == "" {
			parts[i] = fmt.Sprintf("(none)×%d", m[k])
			continue
		}
		parts[i] = fmt.Sprintf("%s×%d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// errWriter keeps the first write error.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return len(p), nil
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = fmt.Errorf("bench: write report: %w", err)
	}
	return n, nil
}

// Bar is a one-line progress bar for a terminal: the scenario, a bar, requests done (of the
// total, or the time of the duration limit), failures and the request rate. It is safe for
// concurrent use.
type Bar struct {
	w        io.Writer
	mu       sync.Mutex
	scenario string
	total    int
	limit    time.Duration
	done     int
	failed   int
	start    time.Time
	drawn    time.Time
}

// NewBar returns a progress bar drawn on w (a terminal).
func NewBar(w io.Writer) *Bar { return &Bar{w: w} }

// Start begins a scenario's bar.
func (b *Bar) Start(scenario string, total int, limit time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.scenario, b.total, b.limit, b.done, b.failed = scenario, total, limit, 0, 0
	b.start = time.Now()
	b.draw(true)
}

// Done counts a finished request.
func (b *Bar) Done(r Result) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done++
	if !r.Success {
		b.failed++
	}
	b.draw(false)
}

// Finish clears the bar.
func (b *Bar) Finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	fmt.Fprint(b.w, "\r\033[K")
}

const barWidth = 30

func (b *Bar) draw(force bool) {
	now := time.Now()
	if !force && now.Sub(b.drawn) < 100*time.Millisecond && b.done != b.total {
		return
	}
	b.drawn = now
	elapsed := now.Sub(b.start)
	frac := 0.0
	switch {
	case b.total > 0:
		frac = float64(b.done) / float64(b.total)
	case b.limit > 0:
		frac = min(1, float64(elapsed)/float64(b.limit))
	}
	fill := int(frac * barWidth)
	bar := strings.Repeat("█", fill) + strings.Repeat("░", barWidth-fill)
	of := "?"
	if b.total > 0 {
		of = fmt.Sprint(b.total)
	}
	rate := 0.0
	if s := elapsed.Seconds(); s > 0 {
		rate = float64(b.done) / s
	}
	fmt.Fprintf(b.w, "\r\033[K%-12s %s %d/%s failed %d  %.2f req/s  %s", b.scenario, bar, b.done, of, b.failed, rate,
		elapsed.Truncate(time.Second))
}
