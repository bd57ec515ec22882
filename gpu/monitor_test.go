package gpu

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
)

// startMonitor starts a monitor on the box, closed at the end of the test (before the host).
func startMonitor(t *testing.T, b box, cfg MonitorConfig) *Monitor {
	t.Helper()
	h := b.open(t)
	if cfg.Interval == 0 {
		cfg.Interval = 10 * time.Millisecond
	}
	m := h.StartMonitor(context.Background(), cfg)
	t.Cleanup(m.Close)
	return m
}

func TestMonitorMetrics(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: 0, NUMA: 0}, spec{FreeGiB: 20, Island: 0, NUMA: 1})
	m := startMonitor(t, b, MonitorConfig{Interval: time.Hour}) // the first sample only
	require.NoError(t, m.Health())

	const want = `
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 80896
DCGM_FI_DEV_FB_FREE{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 20480
# HELP DCGM_FI_DEV_FB_TOTAL Total frame buffer memory (in MiB).
# TYPE DCGM_FI_DEV_FB_TOTAL gauge
DCGM_FI_DEV_FB_TOTAL{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 81920
DCGM_FI_DEV_FB_TOTAL{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 81920
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 1024
DCGM_FI_DEV_FB_USED{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 61440
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 30
DCGM_FI_DEV_GPU_TEMP{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 31
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 0
DCGM_FI_DEV_GPU_UTIL{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 10
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 0
DCGM_FI_DEV_MEM_COPY_UTIL{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 1
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 70.5
DCGM_FI_DEV_POWER_USAGE{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 71.5
# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered (0: none).
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 0
DCGM_FI_DEV_XID_ERRORS{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 0
# HELP govllm:gpu_healthy 1 while the GPU is healthy, 0 once govllm saw it fail (XID, ECC, lost).
# TYPE govllm:gpu_healthy gauge
govllm:gpu_healthy{UUID="GPU-00000000-0000-0000-0000-000000000000",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:10:00.0"} 1
govllm:gpu_healthy{UUID="GPU-00000001-0000-0000-0000-000000000001",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:11:00.0"} 1
`
	require.NoError(t, testutil.CollectAndCompare(m, strings.NewReader(want)))
	problems, err := testutil.CollectAndLint(m)
	require.NoError(t, err)
	for _, p := range problems {
		// dcgm-exporter's metric names carry no unit suffix and its labels (UUID, modelName) are
		// camel case; we keep both so its dashboards work. govllm's own names use vLLM's "govllm:"
		// prefix, as server/metrics.go does. Anything else is ours to fix.
		if strings.Contains(p.Text, "snake_case") || strings.Contains(p.Text, "should not contain ':'") ||
			strings.HasPrefix(p.Metric, "DCGM_FI_DEV_") {
			continue
		}
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}

	// The collector registers cleanly next to others.
	var n int
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(m))
	n, err = testutil.GatherAndCount(reg, "DCGM_FI_DEV_FB_USED")
	require.NoError(t, err)
	require.Equal(t, 2, n)
}

func TestMonitorSamplesInBackground(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0}, spec{FreeGiB: 20, Island: -1, NUMA: 0})
	m := startMonitor(t, b, MonitorConfig{Devices: []int{1}})
	require.Len(t, m.Samples(), 1, "only the placement's devices are monitored")
	b.SetFree(1, 10)
	require.Eventually(t, func() bool {
		s := m.Samples()
		return len(s) == 1 && s[0].MemoryFree == 10*GiB
	}, 5*time.Second, 5*time.Millisecond)
}

func TestMonitorHealth(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		act     func(b box)
		reason  string
		xid     float64
		healthy bool
	}{
		{"critical XID", func(b box) {
			b.Events <- nvml.EventData{Device: b.Devices[1], EventType: nvml.EventTypeXidCriticalError, EventData: 79}
		}, "gpu: device unhealthy: GPU 1 (GPU-00000001-0000-0000-0000-000000000001) reported XID 79 (GPU has fallen off the bus)", 79, false},
		{"unknown XID", func(b box) {
			b.Events <- nvml.EventData{Device: b.Devices[1], EventType: nvml.EventTypeXidCriticalError, EventData: 154}
		}, "gpu: device unhealthy: GPU 1 (GPU-00000001-0000-0000-0000-000000000001) reported XID 154", 154, false},
		{"double-bit ECC event", func(b box) {
			b.Events <- nvml.EventData{Device: b.Devices[1], EventType: nvml.EventTypeDoubleBitEccError}
		}, "gpu: device unhealthy: GPU 1 (GPU-00000001-0000-0000-0000-000000000001) reported a double-bit ECC error", 0, false},
		{"new uncorrected ECC errors", func(b box) { b.SetECC(1, 5) },
			"gpu: device unhealthy: GPU 1 (GPU-00000001-0000-0000-0000-000000000001) has 3 new uncorrected ECC errors", 0, false},
		{"lost device", func(b box) { b.SetLost(1) },
			"gpu: device unhealthy: GPU 1 (GPU-00000001-0000-0000-0000-000000000001) is lost (ERROR_GPU_IS_LOST)", 0, false},
		{"application XID stays healthy", func(b box) {
			b.Events <- nvml.EventData{Device: b.Devices[1], EventType: nvml.EventTypeXidCriticalError, EventData: 13}
		}, "", 13, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0}, spec{FreeGiB: 20, Island: -1, NUMA: 0})
			b.SetECC(1, 2) // errors from before the start do not count
			m := startMonitor(t, b, MonitorConfig{})
			require.NoError(t, m.Health())
			tt.act(b)
			gauge := func(name string) float64 {
				return testutil.ToFloat64(filterGPU(m, name, "1"))
			}
			if tt.healthy {
				require.Eventually(t, func() bool { return gauge("DCGM_FI_DEV_XID_ERRORS") == tt.xid }, 5*time.Second, time.Millisecond)
				require.NoError(t, m.Health())
				require.InDelta(t, 1, gauge("govllm:gpu_healthy"), 0)
				return
			}
			require.Eventually(t, func() bool { return m.Health() != nil }, 5*time.Second, time.Millisecond)
			require.ErrorIs(t, m.Health(), ErrUnhealthy)
			require.EqualError(t, m.Health(), tt.reason)
			require.InDelta(t, 0, gauge("govllm:gpu_healthy"), 0)
			require.InDelta(t, tt.xid, gauge("DCGM_FI_DEV_XID_ERRORS"), 0)
			require.InDelta(t, 1, testutil.ToFloat64(filterGPU(m, "govllm:gpu_healthy", "0")), 0, "the other GPU stays healthy")
		})
	}
}

// TestMonitorWithoutEvents: a driver without NVML events still gets polled, and Close returns.
func TestMonitorWithoutEvents(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0})
	b.Lib.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return nil, nvml.ERROR_NOT_SUPPORTED }
	m := startMonitor(t, b, MonitorConfig{})
	b.SetLost(0)
	require.Eventually(t, func() bool { return m.Health() != nil }, 5*time.Second, time.Millisecond)
}

// TestMonitorStopsWithContext: cancelling the context stops the goroutines (goleak checks).
func TestMonitorStopsWithContext(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0})
	h := b.open(t)
	ctx, cancel := context.WithCancel(context.Background())
	m := h.StartMonitor(ctx, MonitorConfig{Interval: time.Millisecond})
	cancel()
	m.Close()
	m.Close() // idempotent
}

// filterGPU is a collector of m's metric name for one gpu label.
func filterGPU(m *Monitor, name, gpu string) prometheus.Collector {
	return collectorFunc(func(ch chan<- prometheus.Metric) {
		all := make(chan prometheus.Metric, 64)
		m.Collect(all)
		close(all)
		for metric := range all {
			desc := metric.Desc().String()
			if !strings.Contains(desc, `fqName: "`+name+`"`) {
				continue
			}
			if labelValue(metric, "gpu") == gpu {
				ch <- metric
			}
		}
	})
}

// collectorFunc is an unchecked collector.
type collectorFunc func(chan<- prometheus.Metric)

func (f collectorFunc) Describe(chan<- *prometheus.Desc)    {}
func (f collectorFunc) Collect(ch chan<- prometheus.Metric) { f(ch) }

// labelValue reads one label of a metric.
func labelValue(m prometheus.Metric, name string) string {
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		return ""
	}
	for _, l := range pb.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestNoNVMLCallsAfterClose: closing the host under a running monitor (the wrong order) must
// not call NVML after Shutdown, which unloads the library (a crash on real hardware).
func TestNoNVMLCallsAfterClose(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0})
	var shut atomic.Bool
	var late atomic.Int32
	b.Lib.ShutdownFunc = func() nvml.Return { shut.Store(true); return nvml.SUCCESS }
	d := b.Devices[0]
	memV2 := d.GetMemoryInfo_v2Func
	d.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) {
		if shut.Load() {
			late.Add(1)
		}
		return memV2()
	}
	h, err := Open(Config{Lib: b.Lib, Logger: discard()})
	require.NoError(t, err)
	m := h.StartMonitor(context.Background(), MonitorConfig{Interval: time.Microsecond})
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, h.Close())
	time.Sleep(20 * time.Millisecond)
	m.Close()
	require.Zero(t, late.Load(), "NVML called after Shutdown")
	_, err = h.Devices()
	require.ErrorIs(t, err, ErrClosed)
}
