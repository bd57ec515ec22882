// Package gpu finds NVIDIA GPUs through NVML (github.com/NVIDIA/go-nvml), places a model on them
// before the engine starts, and watches them while it serves.
//
//   - [Open] initialises NVML and lists the devices; on a host without the NVIDIA driver it
//     returns [ErrNoNVML] (the caller prints [NoDriverMessage] and runs on CPU), never panics.
//   - [Place] picks the devices for a tensor-parallel group and the gpu_memory_utilization to
//     give vLLM, or refuses with the numbers when the model cannot fit ([FitError]).
//   - [Host.StartMonitor] samples the devices in the background for Prometheus (dcgm-exporter
//     names) and turns XID/ECC errors or a lost device into a health error.
//
// go-nvml needs cgo to build but not the driver: libnvidia-ml.so.1 is opened with dlopen when
// NVML is initialised, so a binary built with this package starts on any Linux host.
package gpu

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NoDriverMessage is the one line to print when NVML cannot be loaded ([ErrNoNVML]).
const NoDriverMessage = "no NVIDIA driver found; running on CPU"

// Errors returned by this package; match them with errors.Is.
var (
	// ErrNoNVML means the NVML library or the NVIDIA kernel driver is missing: a CPU host.
	ErrNoNVML = errors.New("gpu: no NVIDIA driver found")
	// ErrNoGPU means NVML works but lists no device, or none is visible.
	ErrNoGPU = errors.New("gpu: no NVIDIA GPU found")
	// ErrNVML wraps any other NVML failure.
	ErrNVML = errors.New("gpu: NVML error")
	// ErrClosed is returned by a [Host] after Close.
	ErrClosed = errors.New("gpu: host is closed")
	// ErrInsufficientMemory means the model does not fit the best devices ([FitError] says by how much).
	ErrInsufficientMemory = errors.New("gpu: not enough GPU memory")
	// ErrTooFewGPUs means the tensor-parallel size exceeds the usable devices.
	ErrTooFewGPUs = errors.New("gpu: too few GPUs")
	// ErrUnknownGPU means a --gpus or CUDA_VISIBLE_DEVICES entry names no device.
	ErrUnknownGPU = errors.New("gpu: unknown GPU")
	// ErrBadRequest means a placement [Request] is inconsistent.
	ErrBadRequest = errors.New("gpu: bad placement request")
	// ErrUnhealthy is wrapped by [Monitor.Health] once a device has failed.
	ErrUnhealthy = errors.New("gpu: device unhealthy")
)

// MiB and GiB are byte multiples used in messages and metrics.
const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// Device is one GPU as NVML reports it. Figures that the device does not report are -1.
type Device struct {
	// Index is NVML's (and nvidia-smi's) index, in PCI bus order.
	Index int `json:"index"`
	// UUID is the stable identifier ("GPU-…"), used in CUDA_VISIBLE_DEVICES.
	UUID string `json:"uuid"`
	// Name is the product name ("NVIDIA H100 80GB HBM3").
	Name string `json:"name"`
	// MemoryTotal, MemoryUsed and MemoryFree are frame-buffer bytes, as nvidia-smi shows them
	// (NVML's v2 memory info where the driver has it: Used excludes the driver's reservation).
	MemoryTotal uint64 `json:"memory_total_bytes"`
	MemoryUsed  uint64 `json:"memory_used_bytes"`
	MemoryFree  uint64 `json:"memory_free_bytes"`
	// UtilizationGPU and UtilizationMemory are percentages over the last sample period.
	UtilizationGPU    int `json:"utilization_gpu_percent"`
	UtilizationMemory int `json:"utilization_memory_percent"`
	// TemperatureC is the GPU core temperature in degrees Celsius.
	TemperatureC int `json:"temperature_c"`
	// PowerW is the board power draw in watts.
	PowerW float64 `json:"power_w"`
	// PCIBusID is NVML's bus id ("00000000:17:00.0").
	PCIBusID string `json:"pci_bus_id"`
	// NUMANode is the host NUMA node the device is attached to.
	NUMANode int `json:"numa_node"`
	// NVLinkPeers lists the indices of the devices reachable over NVLink (directly or through
	// NVSwitch), sorted.
	NVLinkPeers []int `json:"nvlink_peers"`
}

// Config configures [Open].
type Config struct {
	// Lib is the NVML library; nil means nvml.New(), which dlopens libnvidia-ml.so.1 when
	// Open initialises it. Tests pass go-nvml's mock or a fake embedding nvml.Interface.
	Lib nvml.Interface
	// Logger receives the package's logs; nil means slog.Default().
	Logger *slog.Logger
	// SysfsRoot is where sysfs is mounted, read for a device's NUMA node when NVML does not
	// report it; "" means /sys.
	SysfsRoot string
}

// newLibrary is the production NVML constructor; a seam for tests.
var newLibrary = func() nvml.Interface { return nvml.New() }

// Host is an initialised NVML with the devices found at Open. Its methods are safe for
// concurrent use. Close it to shut NVML down.
type Host struct {
	lib     nvml.Interface
	log     *slog.Logger
	sysfs   string // root of /sys, for the NUMA fallback
	driver  string
	handles []*handle

	// mu guards closed; NVML calls hold it for reading, so that Close (which unloads the
	// library) never runs under one.
	mu     sync.RWMutex
	closed bool
}

// handle is one device found at Open, with its static properties.
type handle struct {
	index int
	uuid  string
	name  string
	busID string
	numa  int
	peers []int
	dev   nvml.Device
}

// Open initialises NVML and finds the devices and their topology. It returns an error wrapping
// [ErrNoNVML] when the library or the kernel driver is missing (print [NoDriverMessage] and run
// on CPU), [ErrNoGPU] when NVML lists no device, and [ErrNVML] for other NVML failures. It
// never calls into NVML after a failed initialisation.
func Open(cfg Config) (*Host, error) {
	h := &Host{lib: cfg.Lib, log: cfg.Logger, sysfs: cfg.SysfsRoot}
	if h.sysfs == "" {
		h.sysfs = "/sys"
	}
	if h.lib == nil {
		h.lib = newLibrary()
	}
	if h.log == nil {
		h.log = slog.Default()
	}
	switch ret := h.lib.Init(); ret {
	case nvml.SUCCESS:
	case nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED:
		return nil, fmt.Errorf("%w (nvml init: %s)", ErrNoNVML, nvmlError(ret))
	default:
		return nil, fmt.Errorf("%w: init: %s", ErrNVML, nvmlError(ret))
	}
	if err := h.discover(); err != nil {
		if ret := h.lib.Shutdown(); ret != nvml.SUCCESS {
			h.log.Debug("gpu: nvml shutdown", "err", nvmlError(ret))
		}
		return nil, err
	}
	return h, nil
}

// discover fills h.handles and h.driver.
func (h *Host) discover() error {
	if v, ret := h.lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		h.driver = v
	}
	n, ret := h.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("%w: device count: %s", ErrNVML, nvmlError(ret))
	}
	for i := range n {
		dev, ret := h.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			h.log.Warn("gpu: skipping a device NVML cannot open", "index", i, "err", nvmlError(ret))
			continue
		}
		uuid, ret := dev.GetUUID()
		if ret != nvml.SUCCESS {
			h.log.Warn("gpu: skipping a device without a UUID", "index", i, "err", nvmlError(ret))
			continue
		}
		hd := &handle{index: i, uuid: uuid, dev: dev, numa: -1}
		if name, ret := dev.GetName(); ret == nvml.SUCCESS {
			hd.name = name
		}
		if pci, ret := dev.GetPciInfo(); ret == nvml.SUCCESS {
			hd.busID = busID(pci.BusId)
		}
		hd.numa = h.numaNode(dev, hd.busID)
		h.handles = append(h.handles, hd)
	}
	if len(h.handles) == 0 {
		return fmt.Errorf("%w (NVML %s lists %d devices)", ErrNoGPU, h.driver, n)
	}
	h.linkPeers()
	return nil
}

// numaNode asks NVML, then sysfs, for the device's NUMA node; -1 when neither knows.
func (h *Host) numaNode(dev nvml.Device, bus string) int {
	if node, ret := dev.GetNumaNodeId(); ret == nvml.SUCCESS {
		return node
	}
	if bus == "" {
		return -1
	}
	// sysfs names devices with a 4-digit domain: "0000:17:00.0"; NVML's bus id has 8.
	id := strings.ToLower(bus)
	if dom, rest, ok := strings.Cut(id, ":"); ok && len(dom) > 4 {
		id = dom[len(dom)-4:] + ":" + rest
	}
	b, err := os.ReadFile(filepath.Join(h.sysfs, "bus", "pci", "devices", id, "numa_node"))
	if err != nil {
		return -1
	}
	node, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || node < 0 {
		return -1
	}
	return node
}

// linkPeers fills each handle's NVLink peers: NVML's P2P status over NVLink (which covers
// NVSwitch systems), else the enabled links whose remote PCI bus id is another device's.
func (h *Host) linkPeers() {
	byBus := map[string]int{}
	for _, hd := range h.handles {
		if hd.busID != "" {
			byBus[strings.ToLower(hd.busID)] = hd.index
		}
	}
	peers := map[int]map[int]bool{}
	add := func(a, b int) {
		for _, p := range [][2]int{{a, b}, {b, a}} {
			if peers[p[0]] == nil {
				peers[p[0]] = map[int]bool{}
			}
			peers[p[0]][p[1]] = true
		}
	}
	p2pWorks := map[int]bool{} // devices whose NVLink P2P status NVML reports
	for i, a := range h.handles {
		for _, b := range h.handles[i+1:] {
			st, ret := a.dev.GetP2PStatus(b.dev, nvml.P2P_CAPS_INDEX_NVLINK)
			if ret != nvml.SUCCESS {
				continue
			}
			p2pWorks[a.index], p2pWorks[b.index] = true, true
			if st == nvml.P2P_STATUS_OK {
				add(a.index, b.index)
			}
		}
	}
	for _, a := range h.handles {
		if p2pWorks[a.index] || len(h.handles) == 1 {
			continue
		}
		for link := range nvml.NVLINK_MAX_LINKS {
			state, ret := a.dev.GetNvLinkState(link)
			if ret != nvml.SUCCESS {
				if ret == nvml.ERROR_NOT_SUPPORTED {
					break // no NVLink on this device
				}
				continue
			}
			if state != nvml.FEATURE_ENABLED {
				continue
			}
			remote, ret := a.dev.GetNvLinkRemotePciInfo(link)
			if ret != nvml.SUCCESS {
				continue
			}
			if j, ok := byBus[strings.ToLower(busID(remote.BusId))]; ok && j != a.index {
				add(a.index, j)
			}
		}
	}
	for _, hd := range h.handles {
		hd.peers = nil
		for p := range peers[hd.index] {
			hd.peers = append(hd.peers, p)
		}
		sort.Ints(hd.peers)
	}
}

// DriverVersion is the NVIDIA driver version NVML reports ("" if it does not).
func (h *Host) DriverVersion() string { return h.driver }

// Devices samples every device found at Open: memory, utilisation, temperature, power, plus
// the topology found at Open. A device that fails to report its memory (lost, reset needed)
// is left out, with a warning.
func (h *Host) Devices() ([]Device, error) {
	out := make([]Device, 0, len(h.handles))
	open := h.use(func() {
		for _, hd := range h.handles {
			d, err := hd.sample()
			if err != nil {
				h.log.Warn("gpu: device not answering", "gpu", hd.index, "uuid", hd.uuid, "err", err)
				continue
			}
			out = append(out, d)
		}
	})
	if !open {
		return nil, ErrClosed
	}
	return out, nil
}

// use runs fn, which calls NVML, unless the host is closed; it reports whether fn ran.
func (h *Host) use(fn func()) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return false
	}
	fn()
	return true
}

// sample reads the device's dynamic figures; it fails only when the memory cannot be read.
func (hd *handle) sample() (Device, error) {
	d := Device{
		Index: hd.index, UUID: hd.uuid, Name: hd.name, PCIBusID: hd.busID, NUMANode: hd.numa,
		NVLinkPeers:    append([]int(nil), hd.peers...),
		UtilizationGPU: -1, UtilizationMemory: -1, TemperatureC: -1, PowerW: -1,
	}
	if m, ret := hd.dev.GetMemoryInfo_v2(); ret == nvml.SUCCESS {
		d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
	} else if ret == nvml.ERROR_GPU_IS_LOST || ret == nvml.ERROR_RESET_REQUIRED {
		return d, fmt.Errorf("%w: memory info: %w", ErrNVML, ret)
	} else {
		m, ret := hd.dev.GetMemoryInfo()
		if ret != nvml.SUCCESS {
			return d, fmt.Errorf("%w: memory info: %w", ErrNVML, ret)
		}
		d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
	}
	if u, ret := hd.dev.GetUtilizationRates(); ret == nvml.SUCCESS {
		d.UtilizationGPU, d.UtilizationMemory = int(u.Gpu), int(u.Memory)
	}
	if t, ret := hd.dev.GetTemperature(nvml.TEMPERATURE_GPU); ret == nvml.SUCCESS {
		d.TemperatureC = int(t)
	}
	if mw, ret := hd.dev.GetPowerUsage(); ret == nvml.SUCCESS {
		d.PowerW = float64(mw) / 1000
	}
	return d, nil
}

// Close shuts NVML down. Stop monitors first ([Monitor.Close]); Close is idempotent.
func (h *Host) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	if ret := h.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("%w: shutdown: %s", ErrNVML, nvmlError(ret))
	}
	return nil
}

// busID converts NVML's NUL-terminated C string.
func busID(raw [32]int8) string {
	b := make([]byte, 0, len(raw))
	for _, c := range raw {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// nvmlError names an NVML return code ("ERROR_LIBRARY_NOT_FOUND"-style when no library is
// loaded to describe it).
func nvmlError(ret nvml.Return) string {
	return ret.Error()
}
