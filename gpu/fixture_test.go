package gpu

import (
	"io"
	"log/slog"
	"sync/atomic"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/govllm/govllm/gpu/gputest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// spec describes one mock GPU: free GiB, NVLink island (-1: none), NUMA node.
type spec = gputest.GPU

// box is a mock NVML host (go-nvml's mock server, wired by gputest).
type box struct{ *gputest.Box }

// newBox builds H100 80GB devices from specs.
func newBox(t *testing.T, specs ...spec) box {
	t.Helper()
	b, err := gputest.New(specs...)
	require.NoError(t, err)
	return box{b}
}

// eightGPUs is gputest.EightGPUs.
func eightGPUs(t *testing.T) box {
	t.Helper()
	b, err := gputest.EightGPUs()
	require.NoError(t, err)
	return box{b}
}

// open opens the box as a Host, closed at the end of the test.
func (b box) open(t *testing.T) *Host {
	t.Helper()
	h, err := Open(Config{Lib: b.Lib, Logger: discard()})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// devices opens the box and samples it.
func (b box) devices(t *testing.T) []Device {
	t.Helper()
	devs, err := b.open(t).Devices()
	require.NoError(t, err)
	return devs
}

// fakeLib is a fake NVML whose Init returns ret; any other call panics (nil embedded
// interface), which proves that nothing else is called after a failed Init.
type fakeLib struct {
	nvml.Interface
	ret   nvml.Return
	inits atomic.Int32
}

func (f *fakeLib) Init() nvml.Return { f.inits.Add(1); return f.ret }

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
