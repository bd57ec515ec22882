package gpu

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultMonitorInterval is how often a [Monitor] samples the devices when
// MonitorConfig.Interval is 0.
const DefaultMonitorInterval = 5 * time.Second

// eventWaitMs bounds one NVML event wait, and so how long Close waits for the event loop.
const eventWaitMs = 500

// MonitorConfig configures [Host.StartMonitor].
type MonitorConfig struct {
	// Interval is the sampling period; 0 means DefaultMonitorInterval.
	Interval time.Duration
	// Devices limits the monitor to these NVML indices (the placement's); nil means all.
	Devices []int
}

// Monitor samples devices in the background. It is a prometheus.Collector exporting the
// latest sample under dcgm-exporter's names and units, so that its dashboards work:
//
//	DCGM_FI_DEV_FB_TOTAL, DCGM_FI_DEV_FB_USED, DCGM_FI_DEV_FB_FREE   frame buffer, MiB
//	DCGM_FI_DEV_GPU_UTIL, DCGM_FI_DEV_MEM_COPY_UTIL                 utilisation, %
//	DCGM_FI_DEV_GPU_TEMP                                            temperature, °C
//	DCGM_FI_DEV_POWER_USAGE                                         power draw, W
//	DCGM_FI_DEV_XID_ERRORS                                          last XID seen (0: none)
//	govllm:gpu_healthy                                              1, or 0 once the device failed
//
// each labelled gpu (NVML index), UUID, pci_bus_id and modelName. It is also a health check:
// [Monitor.Health] fails for good once a device reports a critical XID error, a double-bit
// ECC error, a rise in its uncorrected ECC count, or is lost. Scrapes never call NVML.
type Monitor struct {
	host     *Host
	handles  []*handle
	interval time.Duration
	waitMs   uint32
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu       sync.Mutex
	samples  map[int]Device // by index; a device that stopped answering is absent
	lastXID  map[int]uint64
	failed   map[int]string // why each failed device is unhealthy
	firstErr error
	ecc      map[int]uint64 // uncorrected volatile ECC count at start
}

// Metric descriptors.
var (
	gpuLabels   = []string{"gpu", "UUID", "pci_bus_id", "modelName"}
	descFBTotal = prometheus.NewDesc("DCGM_FI_DEV_FB_TOTAL", "Total frame buffer memory (in MiB).", gpuLabels, nil)
	descFBUsed  = prometheus.NewDesc("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", gpuLabels, nil)
	descFBFree  = prometheus.NewDesc("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", gpuLabels, nil)
	descUtil    = prometheus.NewDesc("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", gpuLabels, nil)
	descMemUtil = prometheus.NewDesc("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", gpuLabels, nil)
	descTemp    = prometheus.NewDesc("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", gpuLabels, nil)
	descPower   = prometheus.NewDesc("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", gpuLabels, nil)
	descXID     = prometheus.NewDesc("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered (0: none).", gpuLabels, nil)
	descHealthy = prometheus.NewDesc("govllm:gpu_healthy", "1 while the GPU is healthy, 0 once govllm saw it fail (XID, ECC, lost).", gpuLabels, nil)
)

// applicationXIDs are XIDs caused by the application (a CUDA fault in a process), not the GPU;
// k8s-device-plugin does not mark devices unhealthy for them either.
var applicationXIDs = map[uint64]bool{13: true, 31: true, 43: true, 45: true, 68: true, 109: true}

// xidNames describes the XIDs that most often mean a broken device.
var xidNames = map[uint64]string{
	48: "double-bit ECC error", 63: "ECC page retirement or row remapping", 64: "ECC page retirement or row remapping failure",
	74: "NVLink error", 79: "GPU has fallen off the bus", 92: "high single-bit ECC error rate",
	94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout", 120: "GSP error",
}

// StartMonitor samples the devices (cfg.Devices, or all) every interval until ctx ends or
// Close is called, and waits for NVML events (XID, ECC) in a second goroutine. It takes the
// first sample before returning, so the first scrape has figures.
func (h *Host) StartMonitor(ctx context.Context, cfg MonitorConfig) *Monitor {
	ctx, cancel := context.WithCancel(ctx)
	m := &Monitor{
		host: h, interval: cfg.Interval, waitMs: eventWaitMs, cancel: cancel,
		samples: map[int]Device{}, lastXID: map[int]uint64{}, failed: map[int]string{}, ecc: map[int]uint64{},
	}
	if m.interval <= 0 {
		m.interval = DefaultMonitorInterval
	}
	for _, hd := range h.handles {
		if cfg.Devices == nil || containsInt(cfg.Devices, hd.index) {
			m.handles = append(m.handles, hd)
		}
	}
	h.use(func() {
		for _, hd := range m.handles {
			if n, ret := hd.dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); ret == nvml.SUCCESS {
				m.ecc[hd.index] = n
			}
		}
	})
	m.sample()
	m.wg.Add(2)
	go m.pollLoop(ctx)
	go m.eventLoop(ctx)
	return m
}

// Close stops the monitor's goroutines and waits for them (at most about half a second, the
// NVML event wait). Close the [Host] after its monitors.
func (m *Monitor) Close() {
	m.cancel()
	m.wg.Wait()
}

// Health returns nil while every monitored device is healthy, else an error wrapping
// [ErrUnhealthy] that names the first failure. A failure is permanent: the process should be
// restarted (and the device checked).
func (m *Monitor) Health() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.firstErr
}

// Samples returns the latest sample of each monitored device that answered, by index.
func (m *Monitor) Samples() []Device {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Device, 0, len(m.samples))
	for _, hd := range m.handles {
		if d, ok := m.samples[hd.index]; ok {
			out = append(out, d)
		}
	}
	return out
}

// Describe sends the metric descriptors (prometheus.Collector).
func (m *Monitor) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFBTotal, descFBUsed, descFBFree, descUtil, descMemUtil, descTemp, descPower, descXID, descHealthy} {
		ch <- d
	}
}

// Collect sends the latest sample (prometheus.Collector); it never calls NVML.
func (m *Monitor) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, hd := range m.handles {
		labels := []string{strconv.Itoa(hd.index), hd.uuid, hd.busID, hd.name}
		gauge := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
		}
		healthy := 1.0
		if _, bad := m.failed[hd.index]; bad {
			healthy = 0
		}
		gauge(descHealthy, healthy)
		gauge(descXID, float64(m.lastXID[hd.index]))
		d, ok := m.samples[hd.index]
		if !ok {
			continue
		}
		gauge(descFBTotal, float64(d.MemoryTotal)/MiB)
		gauge(descFBUsed, float64(d.MemoryUsed)/MiB)
		gauge(descFBFree, float64(d.MemoryFree)/MiB)
		if d.UtilizationGPU >= 0 {
			gauge(descUtil, float64(d.UtilizationGPU))
			gauge(descMemUtil, float64(d.UtilizationMemory))
		}
		if d.TemperatureC >= 0 {
			gauge(descTemp, float64(d.TemperatureC))
		}
		if d.PowerW >= 0 {
			gauge(descPower, d.PowerW)
		}
	}
}

// pollLoop samples every interval.
func (m *Monitor) pollLoop(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.sample()
		}
	}
}

// sample reads every monitored device once, and checks it for loss and new uncorrected ECC errors.
func (m *Monitor) sample() {
	m.host.use(m.sampleOpen)
}

// sampleOpen is sample on an open host.
func (m *Monitor) sampleOpen() {
	for _, hd := range m.handles {
		d, err := hd.sample()
		if err != nil {
			m.mu.Lock()
			delete(m.samples, hd.index)
			m.mu.Unlock()
			if ret, lost := lostReturn(err); lost {
				m.fail(hd, "is lost ("+nvmlError(ret)+")")
			} else {
				m.host.log.Warn("gpu: sampling failed", "gpu", hd.index, "uuid", hd.uuid, "err", err)
			}
			continue
		}
		m.mu.Lock()
		m.samples[hd.index] = d
		base, eccKnown := m.ecc[hd.index]
		m.mu.Unlock()
		if eccKnown {
			if n, ret := hd.dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); ret == nvml.SUCCESS && n > base {
				m.fail(hd, fmt.Sprintf("has %d new uncorrected ECC errors", n-base))
			}
		}
	}
}

// lostReturn reports whether a sampling error means the device is gone or needs a reset.
func lostReturn(err error) (nvml.Return, bool) {
	var ret nvml.Return
	if !errors.As(err, &ret) {
		return ret, false
	}
	switch ret {
	case nvml.ERROR_GPU_IS_LOST, nvml.ERROR_RESET_REQUIRED, nvml.ERROR_GPU_NOT_FOUND:
		return ret, true
	}
	return ret, false
}

// eventLoop registers for critical XID and double-bit ECC events and waits for them. Devices
// or drivers without events are left to the polling.
func (m *Monitor) eventLoop(ctx context.Context) {
	defer m.wg.Done()
	var (
		set        nvml.EventSet
		registered int
	)
	m.host.use(func() { set, registered = m.registerEvents() })
	if set == nil {
		return
	}
	defer m.host.use(func() {
		if ret := set.Free(); ret != nvml.SUCCESS {
			m.host.log.Debug("gpu: freeing the NVML event set", "err", nvmlError(ret))
		}
	})
	if registered == 0 {
		return
	}
	for ctx.Err() == nil {
		var (
			ev  nvml.EventData
			ret nvml.Return
		)
		open := m.host.use(func() {
			if ev, ret = set.Wait(m.waitMs); ret == nvml.SUCCESS {
				m.handleEvent(ev) // may ask NVML for the device's UUID
			}
		})
		if !open {
			return
		}
		switch ret {
		case nvml.SUCCESS, nvml.ERROR_TIMEOUT:
		case nvml.ERROR_GPU_IS_LOST:
			for _, hd := range m.handles {
				m.fail(hd, "is lost (NVML event wait: "+nvmlError(ret)+")")
			}
			return
		default:
			m.host.log.Warn("gpu: waiting for NVML events", "err", nvmlError(ret))
			select {
			case <-ctx.Done():
			case <-time.After(m.interval):
			}
		}
	}
}

// registerEvents creates an event set and registers the monitored devices' critical events;
// a nil set means the driver has no events.
func (m *Monitor) registerEvents() (nvml.EventSet, int) {
	set, ret := m.host.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		m.host.log.Debug("gpu: no NVML events; XID errors will not be seen", "err", nvmlError(ret))
		return nil, 0
	}
	const wanted = uint64(nvml.EventTypeXidCriticalError | nvml.EventTypeDoubleBitEccError)
	registered := 0
	for _, hd := range m.handles {
		supported, ret := hd.dev.GetSupportedEventTypes()
		if ret != nvml.SUCCESS {
			m.host.log.Debug("gpu: no event types", "gpu", hd.index, "err", nvmlError(ret))
			continue
		}
		if mask := supported & wanted; mask != 0 {
			if ret := hd.dev.RegisterEvents(mask, set); ret != nvml.SUCCESS {
				m.host.log.Debug("gpu: cannot register events", "gpu", hd.index, "err", nvmlError(ret))
				continue
			}
			registered++
		}
	}
	return set, registered
}

// handleEvent records one NVML event.
func (m *Monitor) handleEvent(ev nvml.EventData) {
	hd := m.handleOf(ev.Device)
	if hd == nil {
		return
	}
	switch {
	case ev.EventType&nvml.EventTypeDoubleBitEccError != 0:
		m.fail(hd, "reported a double-bit ECC error")
	case ev.EventType&nvml.EventTypeXidCriticalError != 0:
		xid := ev.EventData
		m.mu.Lock()
		m.lastXID[hd.index] = xid
		m.mu.Unlock()
		if applicationXIDs[xid] {
			m.host.log.Warn("gpu: application XID error (a CUDA fault in some process; the GPU stays in use)",
				"gpu", hd.index, "uuid", hd.uuid, "xid", xid)
			return
		}
		what := fmt.Sprintf("reported XID %d", xid)
		if name, ok := xidNames[xid]; ok {
			what += " (" + name + ")"
		}
		m.fail(hd, what)
	}
}

// handleOf finds the monitored handle of an event's device.
func (m *Monitor) handleOf(dev nvml.Device) *handle {
	if dev == nil {
		return nil
	}
	if uuid, ret := dev.GetUUID(); ret == nvml.SUCCESS {
		for _, hd := range m.handles {
			if hd.uuid == uuid {
				return hd
			}
		}
	}
	return nil
}

// fail marks a device unhealthy, once, and logs why.
func (m *Monitor) fail(hd *handle, why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, done := m.failed[hd.index]; done {
		return
	}
	m.failed[hd.index] = why
	err := fmt.Errorf("%w: GPU %d (%s) %s", ErrUnhealthy, hd.index, hd.uuid, why)
	if m.firstErr == nil {
		m.firstErr = err
	}
	m.host.log.Error("gpu: device unhealthy; /health now answers 503", "gpu", hd.index, "uuid", hd.uuid, "reason", why)
}

// containsInt reports whether xs holds x.
func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

var _ prometheus.Collector = (*Monitor)(nil)
