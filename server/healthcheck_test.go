package server

import (
	"errors"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// fakeCheck is a HealthChecker (and, like gpu.Monitor, a collector) whose state a test flips.
type fakeCheck struct {
	err   atomic.Pointer[error]
	gauge prometheus.Gauge
}

func (c *fakeCheck) Health() error {
	if p := c.err.Load(); p != nil {
		return *p
	}
	return nil
}

func (c *fakeCheck) Describe(ch chan<- *prometheus.Desc) { c.gauge.Describe(ch) }
func (c *fakeCheck) Collect(ch chan<- prometheus.Metric) { c.gauge.Collect(ch) }

func TestHealthChecksAndCollectors(t *testing.T) {
	t.Parallel()
	check := &fakeCheck{gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "DCGM_FI_DEV_FB_USED", Help: "Framebuffer memory used (in MiB)."})}
	check.gauge.Set(1234)
	backendErr := atomic.Pointer[error]{}
	b := &fakeBackend{info: testInfo, healthFn: func() error {
		if p := backendErr.Load(); p != nil {
			return *p
		}
		return nil
	}}
	s := newTestServer(t, b, func(c *Config) {
		c.HealthChecks = []HealthChecker{check}
		c.Collectors = []prometheus.Collector{check}
	})

	rec := do(s, http.MethodGet, "/health", "")
	require.Equal(t, http.StatusOK, rec.Code)

	rec = do(s, http.MethodGet, "/metrics", "")
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), "\nDCGM_FI_DEV_FB_USED 1234\n")

	gpuErr := errors.New("gpu: device unhealthy: GPU 1 (GPU-1) reported XID 79 (GPU has fallen off the bus)")
	check.err.Store(&gpuErr)
	rec = do(s, http.MethodGet, "/health", "")
	msg := requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", "")
	require.Equal(t, gpuErr.Error(), msg)

	// The backend's own failure is reported first.
	deadErr := errors.New("engine: dead")
	backendErr.Store(&deadErr)
	rec = do(s, http.MethodGet, "/health", "")
	require.Equal(t, deadErr.Error(), requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", ""))
}
