// Package gputest builds fake NVML hosts for tests, on go-nvml's mock server: H100 80GB
// devices with chosen free memory, NVLink islands and NUMA nodes, whose every NVML call that
// package gpu makes is wired, plus levers to inject failures (a lost device, ECC errors, XID
// events). It needs cgo, as go-nvml does, but no driver.
package gputest

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// GPU describes one fake device.
type GPU struct {
	// FreeGiB is the free memory, of 80 GiB.
	FreeGiB float64
	// Island groups NVLink peers: devices with the same non-negative Island are connected;
	// -1 means no NVLink.
	Island int
	// NUMA is the device's NUMA node.
	NUMA int
}

// Box is a fake NVML host. Lib is what to pass as gpu.Config.Lib.
type Box struct {
	// Lib is the fake NVML (go-nvml's mock server).
	Lib *server.Server
	// Devices are its devices, by index.
	Devices []*server.Device
	// Events delivers NVML events (XID, ECC) to whoever waits on the host's event set.
	Events chan nvml.EventData

	mu        sync.Mutex
	lost      map[int]bool
	ecc       map[int]uint64
	shutdowns atomic.Int32
}

// DriverVersion is the fake driver's version.
const DriverVersion = "580.65.06"

// UUID is the UUID of the fake device with index i.
func UUID(i int) string { return fmt.Sprintf("GPU-%08d-0000-0000-0000-%012d", i, i) }

// BusID is the PCI bus id of the fake device with index i.
func BusID(i int) string { return fmt.Sprintf("00000000:%02X:00.0", 0x10+i) }

// New builds a box with one H100 80GB per spec. Device i reports utilisation 10·i %, memory
// utilisation i %, temperature 30+i °C and power 70.5+i W.
func New(specs ...GPU) (*Box, error) {
	cfgs := make([]gpus.Config, len(specs))
	for i := range cfgs {
		cfgs[i] = gpus.H100_SXM5_80GB
	}
	srv, err := server.New(server.WithGPUs(cfgs...), server.WithDriverVersion(DriverVersion))
	if err != nil {
		return nil, fmt.Errorf("gputest: %w", err)
	}
	b := &Box{Lib: srv, Events: make(chan nvml.EventData, 8), lost: map[int]bool{}, ecc: map[int]uint64{}}
	srv.ShutdownFunc = func() nvml.Return { b.shutdowns.Add(1); return nvml.SUCCESS }
	events := &mock.EventSet{
		WaitFunc: func(uint32) (nvml.EventData, nvml.Return) {
			select {
			case ev := <-b.Events:
				return ev, nvml.SUCCESS
			case <-time.After(5 * time.Millisecond):
				return nvml.EventData{}, nvml.ERROR_TIMEOUT
			}
		},
		FreeFunc: func() nvml.Return { return nvml.SUCCESS },
	}
	srv.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return events, nvml.SUCCESS }
	for i, s := range specs {
		d := srv.Devices[i].(*server.Device)
		d.UUID = UUID(i)
		d.PciBusID = BusID(i)
		b.Devices = append(b.Devices, d)
		b.SetFree(i, s.FreeGiB)
		b.wire(i, s, specs)
	}
	return b, nil
}

// wire sets the mock functions of device i.
func (b *Box) wire(i int, s GPU, specs []GPU) {
	d := b.Devices[i]
	d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.lost[i] {
			return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
		}
		return d.MemoryInfo, nvml.SUCCESS
	}
	d.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) {
		m, ret := d.GetMemoryInfo()
		return nvml.Memory_v2{Total: m.Total, Free: m.Free, Used: m.Used}, ret
	}
	d.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) {
		var p nvml.PciInfo
		for j, c := range d.PciBusID {
			p.BusId[j] = int8(c)
		}
		return p, nvml.SUCCESS
	}
	d.GetNumaNodeIdFunc = func() (int, nvml.Return) { return s.NUMA, nvml.SUCCESS }
	d.GetP2PStatusFunc = func(peer nvml.Device, _ nvml.GpuP2PCapsIndex) (nvml.GpuP2PStatus, nvml.Return) {
		j := peer.(*server.Device).Index
		if s.Island >= 0 && specs[j].Island == s.Island {
			return nvml.P2P_STATUS_OK, nvml.SUCCESS
		}
		return nvml.P2P_STATUS_NOT_SUPPORTED, nvml.SUCCESS
	}
	d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		return nvml.Utilization{Gpu: uint32(10 * i), Memory: uint32(i)}, nvml.SUCCESS
	}
	d.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return uint32(30 + i), nvml.SUCCESS }
	d.GetPowerUsageFunc = func() (uint32, nvml.Return) { return uint32(70500 + 1000*i), nvml.SUCCESS }
	d.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.ecc[i], nvml.SUCCESS
	}
	d.GetSupportedEventTypesFunc = func() (uint64, nvml.Return) { return nvml.EventTypeAll, nvml.SUCCESS }
	d.RegisterEventsFunc = func(uint64, nvml.EventSet) nvml.Return { return nvml.SUCCESS }
}

// SetFree sets device i's free memory (safe while a monitor samples it).
func (b *Box) SetFree(i int, gib float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	d := b.Devices[i]
	total := d.Config.MemoryMB << 20
	free := uint64(gib * (1 << 30))
	d.MemoryInfo = nvml.Memory{Total: total, Free: free, Used: total - free}
}

// SetLost makes device i answer ERROR_GPU_IS_LOST, as a device that fell off the bus does.
func (b *Box) SetLost(i int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lost[i] = true
}

// SetECC sets device i's volatile uncorrected ECC error count.
func (b *Box) SetECC(i int, n uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ecc[i] = n
}

// Shutdowns counts the calls to the library's Shutdown.
func (b *Box) Shutdowns() int { return int(b.shutdowns.Load()) }

// EightGPUs is an 8×H100 box with two NVLink islands of four (0–3 on NUMA node 0, 4–7 on
// node 1) and mixed free memory, so that the freest devices are not the best connected:
//
//	GPU    0   1   2   3 |  4   5   6   7
//	free  79  20  60  61 | 78  50  10  55   GiB
func EightGPUs() (*Box, error) {
	return New(
		GPU{79, 0, 0}, GPU{20, 0, 0}, GPU{60, 0, 0}, GPU{61, 0, 0},
		GPU{78, 1, 1}, GPU{50, 1, 1}, GPU{10, 1, 1}, GPU{55, 1, 1},
	)
}

// Checkpoint writes a model directory into a temporary directory of t: 4 GiB of bfloat16
// weights (a sparse file) and a config whose KV cache takes 128 KiB per token (1 GiB for its
// 8192 positions).
func Checkpoint(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "model.safetensors"))
	if err == nil {
		err = f.Truncate(4 << 30)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"hidden_size":4096,
		"num_attention_heads":32,"num_key_value_heads":8,"num_hidden_layers":32,"max_position_embeddings":8192,
		"torch_dtype":"bfloat16"}`), 0o644)
	}
	if err != nil {
		t.Fatalf("gputest: write checkpoint: %v", err)
	}
	return dir
}
