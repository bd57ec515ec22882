package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/govllm/govllm/engine"
)

// BenchmarkShimPath measures the path of a token from Python into a Go reader: the scripted
// backend's flood calls _govllm_shim.emit in a tight loop (one token per event), the poller
// drains batches and routes them to streams, and one goroutine per stream reads them. The
// baseline, floodnull, runs the same Python loop calling emit_null, a C function that takes
// the same arguments and does nothing. Reported: the median over the iterations of tokens/s
// delivered to Go readers, of the baseline's tokens/s, and their ratio.
//
// Two loops: "flood" is the tightest Python loop there is (a for over range calling emit), so
// the baseline measures little more than the call itself; "stream" has the shape of the bridge's
// loop (an async generator of Delta objects consumed by async for), the least Python work a
// backend does per token.
func BenchmarkShimPath(b *testing.B) {
	if shared == nil {
		b.Skip("the shared engine was closed by the lifecycle test; run with -run '^$'")
	}
	for _, loop := range []string{"flood", "stream"} {
		for _, streams := range []int{1, 8} {
			benchLoop(b, loop, streams)
		}
	}
}

func benchLoop(b *testing.B, loop string, streams int) {
	b.Run(fmt.Sprintf("loop=%s/streams=%d", loop, streams), func(b *testing.B) {
		const perStream = 200_000
		// Medians over the iterations, baseline and measured run alternating: one iteration
		// slowed by the VM or a collection moves the median, not the figure, as with benchstat.
		var goRates, pyRates []float64
		for i := 0; i < b.N; i++ {
			py := flood(b, loop+"null", streams, perStream)
			gor := flood(b, loop, streams, perStream)
			pyRates = append(pyRates, float64(streams*perStream)/py.Seconds())
			goRates = append(goRates, float64(streams*perStream)/gor.Seconds())
		}
		goRate, pyRate := median(goRates), median(pyRates)
		b.ReportMetric(goRate, "tokens/s")
		b.ReportMetric(pyRate, "python-only-tokens/s")
		b.ReportMetric(goRate/pyRate, "ratio")
	})
}

// median returns the middle value of xs (the mean of the two middle ones for an even count).
func median(xs []float64) float64 {
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// flood runs `streams` concurrent flood requests and returns the time until every reader saw
// its last token.
func flood(b *testing.B, op string, streams, n int) time.Duration {
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for s := 0; s < streams; s++ {
		st, err := shared.Generate(context.Background(), engine.Request{Prompt: fmt.Sprintf("%s:%d", op, n)})
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := 0
			for {
				d, err := st.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					errs <- err
					return
				}
				got += len(d.TokenIDs)
			}
			if (op == "flood" || op == "stream") && got != n {
				errs <- fmt.Errorf("got %d tokens, want %d", got, n)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	return time.Since(start)
}
