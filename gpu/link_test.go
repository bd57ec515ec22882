package gpu

import (
	"debug/elf"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestBinaryBindsLazily guards the CPU fallback: go-nvml leaves NVML's symbols unresolved until
// libnvidia-ml is dlopened, so a binary linked with immediate binding (-z now, the default of
// some hardened toolchains) dies at start on a host without the driver ("symbol lookup error:
// undefined symbol: nvml…") instead of running on CPU. Build such binaries with
// go build -ldflags=-extldflags=-Wl,-z,lazy.
func TestBinaryBindsLazily(t *testing.T) {
	t.Parallel()
	exe, err := os.Executable()
	require.NoError(t, err)
	f, err := elf.Open(exe)
	require.NoError(t, err)
	defer f.Close()
	flags, err := f.DynValue(elf.DT_FLAGS)
	require.NoError(t, err)
	for _, v := range flags {
		require.Zero(t, v&uint64(elf.DF_BIND_NOW), "binary linked with BIND_NOW: build with -ldflags=-extldflags=-Wl,-z,lazy")
	}
	flags1, err := f.DynValue(elf.DT_FLAGS_1)
	require.NoError(t, err)
	for _, v := range flags1 {
		require.Zero(t, v&uint64(elf.DF_1_NOW), "binary linked with -z now: build with -ldflags=-extldflags=-Wl,-z,lazy")
	}
}
