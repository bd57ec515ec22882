package server

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/govllm/govllm/engine"
)

// StatsFunc reports the engine's own view of its load (see engine.Engine.Stats).
type StatsFunc func(context.Context) (engine.Stats, error)

// newMetrics builds the /metrics handler. Names follow vLLM's (reference/vllm-api.md §6) with
// the prefix "govllm:", labelled by model_name, so a vLLM dashboard works after renaming.
func (s *Server) newMetrics(stats StatsFunc) http.Handler {
	reg := prometheus.NewRegistry()
	labels := prometheus.Labels{"model_name": s.backend.Model().ID}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "govllm:num_requests_running",
		Help:        "Requests in flight through govllm (submitted and not yet ended).",
		ConstLabels: labels,
	}, func() float64 { return float64(s.running.Load()) }))
	if stats != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "govllm:backend_num_requests_running",
			Help:        "Requests the backend engine itself holds (running or waiting), as it reports them; -1 when it cannot tell or does not answer.",
			ConstLabels: labels,
		}, func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			st, err := stats(ctx)
			if err != nil {
				return -1
			}
			return float64(st.BackendRunning)
		}))
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}
