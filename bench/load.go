package bench

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// DefaultConcurrency is the load scenario's concurrency when neither a concurrency nor a
// request rate is given.
const DefaultConcurrency = 8

// DefaultNumPrompts is the load scenario's request count when neither a count nor a duration
// is given.
const DefaultNumPrompts = 64

// ErrUnboundedLoad means a load run with a duration but no cap on its arrivals.
var ErrUnboundedLoad = errors.New("bench: load with --duration and an infinite --request-rate needs --concurrency")

// load runs the load scenario: requests arrive at RequestRate (Poisson) or as fast as the
// Concurrency slots free up, until NumPrompts were sent or Duration has passed; requests in
// flight then finish. The summary's duration runs from the first send to the last answer.
func (s *run) load() error {
	o := s.o
	rate := o.RequestRate
	if rate <= 0 {
		rate = math.Inf(1)
	}
	conc := o.Concurrency
	if conc <= 0 && o.RequestRate <= 0 {
		conc = DefaultConcurrency
	}
	limit := o.NumPrompts
	if limit <= 0 && o.Duration <= 0 {
		limit = DefaultNumPrompts
	}
	if limit <= 0 && math.IsInf(rate, 1) && conc <= 0 {
		return ErrUnboundedLoad
	}
	cfg := &s.res.Config
	cfg.MaxConcurrency, cfg.NumPrompts, cfg.DurationLimit, cfg.IgnoreEOS = conc, limit, o.Duration.Seconds(), o.IgnoreEOS
	cfg.RequestRate = any(rate)
	if math.IsInf(rate, 1) {
		cfg.RequestRate = "inf"
	}

	if s.r.Client.HTTP == nil { // made here, before the requests share it
		s.r.Client.HTTP = NewHTTPClient(max(conc, 64))
	}
	var sem chan struct{}
	if conc > 0 {
		sem = make(chan struct{}, conc)
	}
	rng := rand.New(rand.NewPCG(uint64(o.Seed), 0x6c6f6164)) // "load"
	var (
		mu      sync.Mutex
		results []Result
		wg      sync.WaitGroup
	)
	s.begin(limit)
	deadline := time.Time{}
	if o.Duration > 0 {
		deadline = s.start.Add(o.Duration)
	}
	expired := func(t time.Time) bool { return !deadline.IsZero() && !t.Before(deadline) }
	next := s.start
	ctx := s.ctx
dispatch:
	for i := 0; limit <= 0 || i < limit; i++ {
		if !math.IsInf(rate, 1) {
			next = next.Add(time.Duration(rng.ExpFloat64() / rate * float64(time.Second)))
			if expired(next) {
				break
			}
			if d := time.Until(next); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-ctx.Done():
					t.Stop()
					break dispatch
				case <-t.C:
				}
			}
		}
		if sem != nil {
			select {
			case <-ctx.Done():
				break dispatch
			case sem <- struct{}{}:
			}
		}
		if expired(time.Now()) || ctx.Err() != nil {
			if sem != nil {
				<-sem
			}
			break
		}
		req := s.request(i, true, o.MaxTokens)
		req.IgnoreEOS = o.IgnoreEOS
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r := s.r.Client.Do(ctx, req)
			r.Index = i
			if sem != nil {
				<-sem
			}
			mu.Lock()
			results = append(results, r)
			mu.Unlock()
			if o.Progress != nil {
				o.Progress.Done(r)
			}
		}(i)
	}
	wg.Wait()
	s.end()
	slices.SortFunc(results, func(a, b Result) int { return a.Index - b.Index })
	if results == nil {
		results = []Result{}
	}
	s.res.Requests = results
	s.checkSucceeded()
	s.checkConsistent()
	s.checkUsage()
	return nil
}
