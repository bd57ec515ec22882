//go:build gpu

package gpu

// On CUDA hosts (go test -tags gpu ./gpu/, run by scripts/gpu-check): the real NVML must list
// the GPUs with the memory figures nvidia-smi reports in the same run, placement must pick one,
// and /metrics (the server with the monitor registered) must show its memory.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/llm"
	"github.com/govllm/govllm/server"
)

// smiGPU is one line of nvidia-smi --query-gpu.
type smiGPU struct {
	index             int
	uuid              string
	totalMiB, usedMiB float64
	reservedMiB       float64 // 0 where nvidia-smi has no memory.reserved
}

// querySMI runs nvidia-smi for the devices' memory, in MiB.
func querySMI(t *testing.T) map[string]smiGPU {
	t.Helper()
	fields := "index,uuid,memory.total,memory.used,memory.reserved"
	out, err := exec.Command("nvidia-smi", "--query-gpu="+fields, "--format=csv,noheader,nounits").Output()
	if err != nil { // older drivers lack memory.reserved
		fields = "index,uuid,memory.total,memory.used"
		out, err = exec.Command("nvidia-smi", "--query-gpu="+fields, "--format=csv,noheader,nounits").Output()
	}
	require.NoError(t, err, "nvidia-smi: %s", out)
	gpus := map[string]smiGPU{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Split(line, ",")
		for i := range f {
			f[i] = strings.TrimSpace(f[i])
		}
		require.GreaterOrEqual(t, len(f), 4, "nvidia-smi line %q", line)
		var g smiGPU
		g.index, err = strconv.Atoi(f[0])
		require.NoError(t, err)
		g.uuid = f[1]
		g.totalMiB, err = strconv.ParseFloat(f[2], 64)
		require.NoError(t, err)
		g.usedMiB, err = strconv.ParseFloat(f[3], 64)
		require.NoError(t, err)
		if len(f) > 4 {
			g.reservedMiB, _ = strconv.ParseFloat(f[4], 64) // "[N/A]" stays 0
		}
		gpus[g.uuid] = g
	}
	return gpus
}

// usedTolMiB allows for other processes allocating between the NVML and nvidia-smi reads.
const usedTolMiB = 64

func TestRealNVML(t *testing.T) {
	h, err := Open(Config{Logger: discard()})
	require.NoError(t, err, "a CUDA host must have a working NVML")
	defer func() { require.NoError(t, h.Close()) }()
	t.Logf("driver %s", h.DriverVersion())

	before, err := h.Devices()
	require.NoError(t, err)
	smi := querySMI(t)
	after, err := h.Devices()
	require.NoError(t, err)
	require.Len(t, before, len(smi), "NVML and nvidia-smi list the same GPUs")

	for i, d := range before {
		t.Logf("GPU %d %s %s: %.0f/%.0f MiB used, free %.0f MiB, util %d%%, %d C, %.0f W, bus %s, NUMA %d, NVLink %v",
			d.Index, d.Name, d.UUID, float64(d.MemoryUsed)/MiB, float64(d.MemoryTotal)/MiB, float64(d.MemoryFree)/MiB,
			d.UtilizationGPU, d.TemperatureC, d.PowerW, d.PCIBusID, d.NUMANode, d.NVLinkPeers)
		s, ok := smi[d.UUID]
		require.True(t, ok, "nvidia-smi lists %s", d.UUID)
		require.Equal(t, s.index, d.Index)
		require.InDelta(t, s.totalMiB, float64(d.MemoryTotal)/MiB, 1, "memory.total of GPU %d", d.Index)
		lo := math.Min(float64(before[i].MemoryUsed), float64(after[i].MemoryUsed))/MiB - usedTolMiB
		hi := math.Max(float64(before[i].MemoryUsed), float64(after[i].MemoryUsed))/MiB + usedTolMiB
		used := s.usedMiB
		if used < lo || used > hi {
			// Drivers whose memory.used counts the reservation (NVML v1 semantics).
			used -= s.reservedMiB
		}
		require.True(t, used >= lo && used <= hi, "memory.used of GPU %d: nvidia-smi %.0f MiB (reserved %.0f), NVML %.0f–%.0f MiB",
			d.Index, s.usedMiB, s.reservedMiB, lo+usedTolMiB, hi-usedTolMiB)
		require.NotEmpty(t, d.Name)
		require.Regexp(t, regexp.MustCompile(`^[0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$`), d.PCIBusID)
	}

	// Placement picks a GPU (the freest one CUDA_VISIBLE_DEVICES shows) for a 1 GiB model.
	p, err := Place(after, Request{TensorParallel: 1, ModelBytes: GiB})
	require.NoError(t, err)
	require.Len(t, p.Devices, 1)
	t.Logf("placement: %s; %v", p, p.Env())
	require.Greater(t, p.GPUMemoryUtilization, 0.0)
	require.Equal(t, []string{VisibleDevicesEnv + "=" + p.Devices[0].UUID}, p.Env())
	var fe *FitError
	_, err = Place(after, Request{TensorParallel: 1, ModelBytes: 4 * p.Devices[0].MemoryTotal})
	require.True(t, errors.As(err, &fe), "a model 4× the GPU's memory does not fit: %v", err)
	t.Logf("too big: %v", err)

	// /metrics shows the placed GPU's memory.
	m := h.StartMonitor(context.Background(), MonitorConfig{Interval: 100 * time.Millisecond, Devices: p.Indices()})
	defer m.Close()
	require.NoError(t, m.Health())
	srv := server.New(server.Config{Backend: idleBackend{}, Logger: discard(),
		Collectors: []prometheus.Collector{m}, HealthChecks: []server.HealthChecker{m}})
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	d := p.Devices[0]
	line := fmt.Sprintf(`DCGM_FI_DEV_FB_TOTAL{UUID="%s",gpu="%d",modelName="%s",pci_bus_id="%s"} `, d.UUID, d.Index, d.Name, d.PCIBusID)
	total := metricValue(t, rec.Body.Bytes(), line)
	require.InDelta(t, smi[d.UUID].totalMiB, total, 1)
	used := metricValue(t, rec.Body.Bytes(), strings.Replace(line, "FB_TOTAL", "FB_USED", 1))
	require.InDelta(t, float64(d.MemoryUsed)/MiB, used, 1024, "FB_USED near the placement's sample")
	rec = httptest.NewRecorder()
	srv.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
	require.Equal(t, http.StatusOK, rec.Code)
}

// metricValue finds the sample line starting with prefix in a /metrics body.
func metricValue(t *testing.T, body []byte, prefix string) float64 {
	t.Helper()
	for _, l := range bytes.Split(body, []byte("\n")) {
		if v, ok := bytes.CutPrefix(l, []byte(prefix)); ok {
			f, err := strconv.ParseFloat(string(v), 64)
			require.NoError(t, err)
			return f
		}
	}
	require.Failf(t, "metric missing", "%q not in /metrics:\n%s", prefix, body)
	return 0
}

// idleBackend is an llm.Generator that serves no request.
type idleBackend struct{}

func (idleBackend) Generate(context.Context, engine.Request) (llm.TokenStream, error) {
	return nil, errors.New("idle backend")
}
func (idleBackend) Model() engine.ModelInfo { return engine.ModelInfo{ID: "gpu-check"} }
func (idleBackend) Health() error           { return nil }
