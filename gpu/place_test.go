package gpu

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/gpu/gputest"
)

// noEnv is a LookupEnv with CUDA_VISIBLE_DEVICES unset.
func noEnv(string) (string, bool) { return "", false }

// env is a LookupEnv with CUDA_VISIBLE_DEVICES set to v.
func env(v string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		if k == VisibleDevicesEnv {
			return v, true
		}
		return "", false
	}
}

// uuidOf is the box's UUID for device i.
func uuidOf(i int) string { return gputest.UUID(i) }

// TestPlaceEightGPUs runs placement on the mock 8×H100 box (80 GiB each):
//
//	GPU    0   1   2   3 |  4   5   6   7
//	free  79  20  60  61 | 78  50  10  55   GiB
//	NVLink island A (NUMA 0) | island B (NUMA 1)
//
// The default headroom is 5% (4 GiB), and utilisation is capped at 0.92.
func TestPlaceEightGPUs(t *testing.T) {
	t.Parallel()
	devs := eightGPUs(t).devices(t)
	tests := []struct {
		name    string
		req     Request
		want    []int
		util    float64
		nvlink  bool
		numa    []int
		wantErr error
		message string
	}{
		{name: "TP1 takes the freest GPU", req: Request{TensorParallel: 1, ModelBytes: GiB},
			want: []int{0}, util: 0.92, nvlink: true, numa: []int{0}},
		{name: "TP0 means 1", req: Request{ModelBytes: GiB}, want: []int{0}, util: 0.92, nvlink: true, numa: []int{0}},
		{name: "TP1 with the freest GPUs hidden", req: Request{TensorParallel: 1, LookupEnv: env("1,2,3,5,6,7")},
			want: []int{3}, util: 0.71, nvlink: true, numa: []int{0}},
		// The freest pair (0,4) crosses islands; the best NVLink pair is 0,3 (min 61 GiB).
		{name: "TP2 prefers an NVLink pair over the freest pair", req: Request{TensorParallel: 2, ModelBytes: 16 * GiB},
			want: []int{0, 3}, util: 0.71, nvlink: true, numa: []int{0}},
		// Island A's smallest is 20 GiB (util 0.20), island B's 10 GiB.
		{name: "TP4 takes the island with more room", req: Request{TensorParallel: 4, ModelBytes: 16 * GiB, KVBytes: 8 * GiB},
			want: []int{0, 1, 2, 3}, util: 0.20, nvlink: true, numa: []int{0}},
		// 25 GiB per GPU fits neither island; three of island A plus the freest of B do.
		{name: "TP4 too big for an island spans both", req: Request{TensorParallel: 4, ModelBytes: 100 * GiB},
			want: []int{0, 2, 3, 4}, util: 0.70, nvlink: false, numa: []int{0, 1}},
		{name: "TP8 takes all", req: Request{TensorParallel: 8, ModelBytes: 8 * GiB},
			want: []int{0, 1, 2, 3, 4, 5, 6, 7}, util: 0.07, nvlink: false, numa: []int{0, 1}},
		{name: "TP8 too big", req: Request{TensorParallel: 8, ModelBytes: 80 * GiB}, wantErr: ErrInsufficientMemory,
			message: "gpu: model needs 80.0 GiB (80.0 GiB weights + 0.0 GiB KV cache), the best 8 GPUs (0,1,2,3,4,5,6,7) " +
				"have 413.0 GiB free (44.8 GiB usable with 5% headroom): free GPU memory, use more GPUs " +
				"(--tensor-parallel-size), lower --max-model-len or pick a smaller model"},
		{name: "TP2 too big names the best pair", req: Request{TensorParallel: 2, ModelBytes: 150 * GiB, KVBytes: 10 * GiB},
			wantErr: ErrInsufficientMemory,
			message: "gpu: model needs 160.0 GiB (150.0 GiB weights + 10.0 GiB KV cache), the best 2 GPUs (0,4) " +
				"have 157.0 GiB free (147.2 GiB usable with 5% headroom): free GPU memory, use more GPUs " +
				"(--tensor-parallel-size), lower --max-model-len or pick a smaller model"},
		{name: "TP1 too big", req: Request{ModelBytes: 75 * GiB}, wantErr: ErrInsufficientMemory,
			message: "gpu: model needs 75.0 GiB (75.0 GiB weights + 0.0 GiB KV cache), the best GPU (0) " +
				"has 79.0 GiB free (73.6 GiB usable with 5% headroom): free GPU memory, use more GPUs " +
				"(--tensor-parallel-size), lower --max-model-len or pick a smaller model"},
		{name: "TP16 on 8", req: Request{TensorParallel: 16}, wantErr: ErrTooFewGPUs,
			message: "gpu: too few GPUs: tensor parallel size 16 needs 16 GPUs, this host has 8"},

		// CUDA_VISIBLE_DEVICES.
		{name: "preset CUDA_VISIBLE_DEVICES by index", req: Request{TensorParallel: 2, LookupEnv: env("4,5,6,7")},
			want: []int{4, 7}, util: 0.63, nvlink: true, numa: []int{1}},
		{name: "preset CUDA_VISIBLE_DEVICES by UUID and prefix", req: Request{TensorParallel: 1,
			LookupEnv: env(uuidOf(6) + ", GPU-00000001")}, want: []int{1}, util: 0.2, nvlink: true, numa: []int{0}},
		{name: "preset CUDA_VISIBLE_DEVICES too short", req: Request{TensorParallel: 4, LookupEnv: env("1,2")},
			wantErr: ErrTooFewGPUs, message: "gpu: too few GPUs: tensor parallel size 4 needs 4 GPUs, CUDA_VISIBLE_DEVICES=1,2 shows 2"},
		{name: "CUDA_VISIBLE_DEVICES stops at an unknown entry", req: Request{TensorParallel: 1, LookupEnv: env("6,-1,0")},
			want: []int{6}, util: 0.07, nvlink: true, numa: []int{1}},
		{name: "empty CUDA_VISIBLE_DEVICES means CPU", req: Request{TensorParallel: 2, LookupEnv: env("")}},
		{name: "CUDA_VISIBLE_DEVICES=-1 means CPU", req: Request{TensorParallel: 1, LookupEnv: env("-1")}},

		// --gpus.
		{name: "explicit GPUs", req: Request{GPUs: []string{"5", "6"}},
			want: []int{5, 6}, util: 0.07, nvlink: true, numa: []int{1}},
		{name: "explicit GPUs by UUID, in any order", req: Request{TensorParallel: 2, GPUs: []string{uuidOf(6), "GPU-00000001"}},
			want: []int{1, 6}, util: 0.07, nvlink: false, numa: []int{0, 1}},
		{name: "explicit GPUs as a pool", req: Request{TensorParallel: 2, GPUs: []string{"0", "1", "2", "4"}},
			want: []int{0, 2}, util: 0.70, nvlink: true, numa: []int{0}},
		{name: "explicit GPUs within CUDA_VISIBLE_DEVICES", req: Request{GPUs: []string{"5"}, LookupEnv: env("4,5")},
			want: []int{5}, util: 0.57, nvlink: true, numa: []int{1}},
		{name: "explicit GPU outside CUDA_VISIBLE_DEVICES", req: Request{GPUs: []string{"3"}, LookupEnv: env("4,5")},
			wantErr: ErrUnknownGPU, message: "gpu: unknown GPU: no GPU with index 3 in --gpus 3 (only CUDA_VISIBLE_DEVICES=4,5 are visible)"},
		{name: "explicit GPUs too few for TP", req: Request{TensorParallel: 4, GPUs: []string{"0", "1"}},
			wantErr: ErrTooFewGPUs, message: "gpu: too few GPUs: tensor parallel size 4 needs 4 GPUs, --gpus lists 2"},
		{name: "explicit unknown GPU", req: Request{GPUs: []string{"9"}}, wantErr: ErrUnknownGPU,
			message: "gpu: unknown GPU: no GPU with index 9 in --gpus 9"},
		{name: "explicit ambiguous prefix", req: Request{GPUs: []string{"GPU-0000000"}}, wantErr: ErrUnknownGPU,
			message: `gpu: unknown GPU: "GPU-0000000" matches 8 GPUs' UUIDs in --gpus GPU-0000000`},
		{name: "explicit MIG", req: Request{GPUs: []string{"MIG-abc"}}, wantErr: ErrUnknownGPU},
		{name: "explicit duplicate", req: Request{GPUs: []string{"0", uuidOf(0)}}, wantErr: ErrBadRequest},
		{name: "explicit GPUs but CUDA_VISIBLE_DEVICES hides all", req: Request{GPUs: []string{"0"}, LookupEnv: env("")},
			wantErr: ErrNoGPU},
		{name: "explicit GPU too small", req: Request{GPUs: []string{"6"}, ModelBytes: 8 * GiB}, wantErr: ErrInsufficientMemory},

		// Headroom and the utilisation cap.
		{name: "no headroom", req: Request{Headroom: -1, MaxUtilization: 0.99}, want: []int{0}, util: 0.98, nvlink: true, numa: []int{0}},
		{name: "20% headroom", req: Request{Headroom: 0.2}, want: []int{0}, util: 0.78, nvlink: true, numa: []int{0}},
		{name: "headroom above 1", req: Request{Headroom: 1.5}, wantErr: ErrBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if tt.req.LookupEnv == nil {
				tt.req.LookupEnv = noEnv
			}
			p, err := Place(devs, tt.req)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				if tt.message != "" {
					require.EqualError(t, err, tt.message)
				}
				return
			}
			require.NoError(t, err)
			if tt.want == nil {
				require.True(t, p.CPU(), "want CPU, got %s", p)
				require.Nil(t, p.Env())
				return
			}
			require.Equal(t, tt.want, p.Indices())
			require.InDelta(t, tt.util, p.GPUMemoryUtilization, 1e-9)
			require.Equal(t, tt.nvlink, p.NVLink)
			require.Equal(t, tt.numa, p.NUMANodes)
			require.GreaterOrEqual(t, p.BudgetBytes, p.NeedBytes)
			uuids := make([]string, len(tt.want))
			for i, idx := range tt.want {
				uuids[i] = uuidOf(idx)
			}
			require.Equal(t, uuids, p.UUIDs())
		})
	}
}

func TestPlaceFitErrorFields(t *testing.T) {
	t.Parallel()
	devs := eightGPUs(t).devices(t)
	_, err := Place(devs, Request{TensorParallel: 2, ModelBytes: 150 * GiB, KVBytes: 10 * GiB, LookupEnv: noEnv})
	var fe *FitError
	require.True(t, errors.As(err, &fe))
	require.Equal(t, []int{0, 4}, fe.Devices)
	require.EqualValues(t, 157*GiB, fe.FreeBytes)
	require.EqualValues(t, 150*GiB, fe.ModelBytes)
	require.EqualValues(t, 10*GiB, fe.KVBytes)
	require.InDelta(t, 0.05, fe.Headroom, 0)
}

// TestPlacePrefersSameNUMA: on a PCIe box without NVLink, a same-node pair beats a freer pair
// that spans two NUMA nodes.
func TestPlacePrefersSameNUMA(t *testing.T) {
	t.Parallel()
	devs := newBox(t, spec{FreeGiB: 70, Island: -1, NUMA: 0}, spec{FreeGiB: 40, Island: -1, NUMA: 0}, spec{FreeGiB: 75, Island: -1, NUMA: 1}, spec{FreeGiB: 50, Island: -1, NUMA: 1}).devices(t)
	p, err := Place(devs, Request{TensorParallel: 2, ModelBytes: 10 * GiB, LookupEnv: noEnv})
	require.NoError(t, err)
	require.Equal(t, []int{2, 3}, p.Indices())
	require.Equal(t, []int{1}, p.NUMANodes)
	require.False(t, p.NVLink)
	require.Equal(t, "GPU 2,3, gpu_memory_utilization=0.57 (5.0 GiB of 45.6 GiB per device for the model), "+
		"no NVLink between all of them, NUMA node 1", p.String())
	require.Equal(t, []string{"CUDA_VISIBLE_DEVICES=" + uuidOf(2) + "," + uuidOf(3)}, p.Env())
}

func TestPlaceNoDevices(t *testing.T) {
	t.Parallel()
	p, err := Place(nil, Request{LookupEnv: noEnv})
	require.NoError(t, err)
	require.True(t, p.CPU())
	_, err = Place(nil, Request{GPUs: []string{"0"}, LookupEnv: noEnv})
	require.ErrorIs(t, err, ErrNoGPU)
	require.EqualError(t, err, "gpu: no NVIDIA GPU found: --gpus 0 given, but this host has no NVIDIA GPU")
}

// TestPlaceManyGPUs: beyond the exhaustive search's bound the freest devices are taken.
func TestPlaceManyGPUs(t *testing.T) {
	t.Parallel()
	var devs []Device
	for i := range 40 {
		devs = append(devs, Device{Index: i, UUID: "GPU-" + string(rune('a'+i%26)) + string(rune('0'+i/26)),
			MemoryTotal: 80 * GiB, MemoryFree: uint64(10+i) * GiB, NUMANode: -1})
	}
	p, err := Place(devs, Request{TensorParallel: 8, LookupEnv: noEnv})
	require.NoError(t, err)
	require.Equal(t, []int{32, 33, 34, 35, 36, 37, 38, 39}, p.Indices())
}

func TestParseGPUList(t *testing.T) {
	t.Parallel()
	require.Equal(t, []string{"0", "GPU-1"}, ParseGPUList(" 0, ,GPU-1 "))
	require.Nil(t, ParseGPUList(""))
}

func TestCombinations(t *testing.T) {
	t.Parallel()
	devs := []Device{{Index: 0}, {Index: 1}, {Index: 2}, {Index: 3}}
	var got [][]int
	forEachCombination(devs, 2, func(s []Device) { got = append(got, []int{s[0].Index, s[1].Index}) })
	require.Equal(t, [][]int{{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}}, got)
	require.Equal(t, 70, binomial(8, 4))
	require.Equal(t, maxCombinations+1, binomial(40, 8))
}
