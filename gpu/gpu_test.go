package gpu

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/stretchr/testify/require"
)

func TestOpenInitFailure(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		ret     nvml.Return
		noNVML  bool
		message string
	}{
		{"no library", nvml.ERROR_LIBRARY_NOT_FOUND, true, "gpu: no NVIDIA driver found (nvml init: ERROR_LIBRARY_NOT_FOUND)"},
		{"no kernel driver", nvml.ERROR_DRIVER_NOT_LOADED, true, "gpu: no NVIDIA driver found (nvml init: ERROR_DRIVER_NOT_LOADED)"},
		{"no permission", nvml.ERROR_NO_PERMISSION, false, "gpu: NVML error: init: ERROR_NO_PERMISSION"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			lib := &fakeLib{ret: tt.ret}
			h, err := Open(Config{Lib: lib, Logger: discard()})
			require.Nil(t, h)
			require.Equal(t, tt.noNVML, errors.Is(err, ErrNoNVML))
			require.Equal(t, !tt.noNVML, errors.Is(err, ErrNVML))
			require.EqualError(t, err, tt.message)
			require.EqualValues(t, 1, lib.inits.Load())
		})
	}
}

// TestOpenFallsBackToCPU is the CPU path end to end: NVML init fails, Place gets no devices and
// answers CPU, with an empty environment.
func TestOpenFallsBackToCPU(t *testing.T) {
	t.Parallel()
	_, err := Open(Config{Lib: &fakeLib{ret: nvml.ERROR_LIBRARY_NOT_FOUND}, Logger: discard()})
	require.ErrorIs(t, err, ErrNoNVML)
	p, err := Place(nil, Request{TensorParallel: 2, ModelBytes: 100 * GiB, LookupEnv: noEnv})
	require.NoError(t, err)
	require.True(t, p.CPU())
	require.Nil(t, p.Env())
	require.Equal(t, "CPU", p.String())
}

// TestOpenRealLibrary runs the production constructor: on a host without libnvidia-ml it must
// report ErrNoNVML (never panic); on a GPU host it must list devices.
func TestOpenRealLibrary(t *testing.T) {
	t.Parallel()
	h, err := Open(Config{Logger: discard()})
	if err != nil {
		require.True(t, errors.Is(err, ErrNoNVML) || errors.Is(err, ErrNoGPU), "unexpected error: %v", err)
		t.Logf("no NVML here: %v", err)
		return
	}
	defer func() { require.NoError(t, h.Close()) }()
	devs, err := h.Devices()
	require.NoError(t, err)
	require.NotEmpty(t, devs)
}

func TestOpenNoDevices(t *testing.T) {
	t.Parallel()
	b := newBox(t)
	h, err := Open(Config{Lib: b.Lib, Logger: discard()})
	require.Nil(t, h)
	require.ErrorIs(t, err, ErrNoGPU)
	require.EqualValues(t, 1, b.Shutdowns(), "NVML is shut down after a failed discovery")
}

func TestDevices(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: 0, NUMA: 0}, spec{FreeGiB: 20, Island: 0, NUMA: 0}, spec{FreeGiB: 60, Island: -1, NUMA: 1})
	h := b.open(t)
	require.Equal(t, "580.65.06", h.DriverVersion())
	devs, err := h.Devices()
	require.NoError(t, err)
	require.Len(t, devs, 3)
	require.Equal(t, Device{
		Index: 1, UUID: "GPU-00000001-0000-0000-0000-000000000001", Name: "NVIDIA H100 80GB HBM3",
		MemoryTotal: 80 * GiB, MemoryUsed: 60 * GiB, MemoryFree: 20 * GiB,
		UtilizationGPU: 10, UtilizationMemory: 1, TemperatureC: 31, PowerW: 71.5,
		PCIBusID: "00000000:11:00.0", NUMANode: 0, NVLinkPeers: []int{0},
	}, devs[1])
	require.Equal(t, []int{1}, devs[0].NVLinkPeers)
	require.Empty(t, devs[2].NVLinkPeers)
	require.Equal(t, 1, devs[2].NUMANode)

	require.NoError(t, h.Close())
	require.NoError(t, h.Close(), "Close is idempotent")
	require.EqualValues(t, 1, b.Shutdowns())
	_, err = h.Devices()
	require.ErrorIs(t, err, ErrClosed)
}

func TestDevicesMemoryFallbackAndLoss(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0}, spec{FreeGiB: 20, Island: -1, NUMA: 0})
	// An older driver without the v2 call: the v1 figures are used.
	b.Devices[0].GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) { return nvml.Memory_v2{}, nvml.ERROR_FUNCTION_NOT_FOUND }
	b.SetLost(1)
	devs := b.devices(t)
	require.Len(t, devs, 1, "a lost device is left out")
	require.EqualValues(t, 79*GiB, devs[0].MemoryFree)
}

func TestDiscoverSkipsUnopenableDevice(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 79, Island: -1, NUMA: 0}, spec{FreeGiB: 20, Island: -1, NUMA: 0})
	srv := b.Lib
	srv.DeviceGetHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		if i == 0 {
			return nil, nvml.ERROR_GPU_IS_LOST
		}
		return srv.Devices[i], nvml.SUCCESS
	}
	devs := b.devices(t)
	require.Len(t, devs, 1)
	require.Equal(t, 1, devs[0].Index)
}

// TestNVLinkFromLinks covers drivers without the NVLink P2P status: peers come from the
// enabled links' remote PCI bus ids.
func TestNVLinkFromLinks(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 70, Island: -1, NUMA: 0}, spec{FreeGiB: 70, Island: -1, NUMA: 0}, spec{FreeGiB: 70, Island: -1, NUMA: 0})
	for i, d := range b.Devices {
		d.GetP2PStatusFunc = func(nvml.Device, nvml.GpuP2PCapsIndex) (nvml.GpuP2PStatus, nvml.Return) {
			return 0, nvml.ERROR_NOT_SUPPORTED
		}
		// 0 and 1 are bridged by links 0-3; 2 has NVLink hardware but no enabled link.
		d.GetNvLinkStateFunc = func(link int) (nvml.EnableState, nvml.Return) {
			if link >= 4 {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			if i == 2 {
				return nvml.FEATURE_DISABLED, nvml.SUCCESS
			}
			return nvml.FEATURE_ENABLED, nvml.SUCCESS
		}
		peer := b.Devices[1-min(i, 1)]
		d.GetNvLinkRemotePciInfoFunc = func(int) (nvml.PciInfo, nvml.Return) { return peer.GetPciInfo() }
	}
	devs := b.devices(t)
	require.Equal(t, []int{1}, devs[0].NVLinkPeers)
	require.Equal(t, []int{0}, devs[1].NVLinkPeers)
	require.Empty(t, devs[2].NVLinkPeers)
}

// TestNUMAFromSysfs covers drivers without nvmlDeviceGetNumaNodeId.
func TestNUMAFromSysfs(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	dir := filepath.Join(root, "bus", "pci", "devices", "0000:10:00.0")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "numa_node"), []byte("1\n"), 0o644))

	b := newBox(t, spec{FreeGiB: 70, Island: -1, NUMA: 0}, spec{FreeGiB: 70, Island: -1, NUMA: 0})
	for _, d := range b.Devices {
		d.GetNumaNodeIdFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	}
	h, err := Open(Config{Lib: b.Lib, Logger: discard(), SysfsRoot: root})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	devs, err := h.Devices()
	require.NoError(t, err)
	require.Equal(t, 1, devs[0].NUMANode)
	require.Equal(t, -1, devs[1].NUMANode, "no sysfs entry: unknown")
}

// TestUnsupportedFigures: a device that reports only its memory gets -1 for the rest.
func TestUnsupportedFigures(t *testing.T) {
	t.Parallel()
	b := newBox(t, spec{FreeGiB: 70, Island: -1, NUMA: 0})
	d := b.Devices[0]
	d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED }
	d.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	d.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	devs := b.devices(t)
	require.Equal(t, -1, devs[0].UtilizationGPU)
	require.Equal(t, -1, devs[0].TemperatureC)
	require.InDelta(t, -1, devs[0].PowerW, 0)
}

var _ nvml.Interface = (*server.Server)(nil)
var _ nvml.EventSet = (*mock.EventSet)(nil)
