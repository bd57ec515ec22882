package gpu

import (
	"fmt"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Placement defaults.
const (
	// DefaultHeadroom is the fraction of each device's memory left unused when Request.Headroom is 0.
	DefaultHeadroom = 0.05
	// DefaultMaxUtilization caps gpu_memory_utilization when Request.MaxUtilization is 0; it is
	// vLLM's own default.
	DefaultMaxUtilization = 0.92
	// maxCombinations bounds the exhaustive search; beyond it the freest devices are taken.
	maxCombinations = 200_000
)

// VisibleDevicesEnv is the variable CUDA reads to restrict and order the devices it shows.
const VisibleDevicesEnv = "CUDA_VISIBLE_DEVICES"

// Request says what to place.
type Request struct {
	// TensorParallel is the number of devices to use; 0 means 1, or len(GPUs) when GPUs is set.
	TensorParallel int
	// GPUs restricts the choice to these devices (--gpus), each an NVML index ("3"), a UUID
	// or a unique UUID prefix ("GPU-8932f937"). With as many entries as TensorParallel they are
	// the placement; with more, the best TensorParallel of them are chosen.
	GPUs []string
	// Headroom is the fraction of each device's total memory to leave unused, on top of what
	// other processes already use; 0 means DefaultHeadroom and a negative value means none.
	Headroom float64
	// MaxUtilization caps the gpu_memory_utilization handed to the engine; 0 means
	// DefaultMaxUtilization.
	MaxUtilization float64
	// ModelBytes is the weights' size (see [ReadCheckpoint]), split evenly over the devices.
	ModelBytes uint64
	// KVBytes is the KV-cache budget the model needs at least, over all devices.
	KVBytes uint64
	// LookupEnv reads CUDA_VISIBLE_DEVICES; nil means os.LookupEnv. When the variable is set,
	// only the devices it lists are candidates: NVML indices (which are CUDA's with
	// CUDA_DEVICE_ORDER=PCI_BUS_ID) or UUIDs, up to the first entry that names no GPU, as CUDA
	// reads it; so "" or "-1" means none, and the placement is CPU.
	LookupEnv func(key string) (string, bool)
}

// Placement is where the model goes. The zero Placement means CPU.
type Placement struct {
	// Devices are the chosen devices, by index.
	Devices []Device `json:"devices"`
	// GPUMemoryUtilization is the fraction of each device's memory the engine may take (vLLM's
	// gpu_memory_utilization): the smallest free fraction among Devices less the headroom,
	// capped, rounded down to hundredths.
	GPUMemoryUtilization float64 `json:"gpu_memory_utilization"`
	// NeedBytes is what the model needs per device: (ModelBytes+KVBytes)/len(Devices).
	NeedBytes uint64 `json:"need_bytes_per_device"`
	// BudgetBytes is what GPUMemoryUtilization grants on the smallest device.
	BudgetBytes uint64 `json:"budget_bytes_per_device"`
	// NVLink is true when every pair of Devices is NVLink-connected (trivially, for one).
	NVLink bool `json:"nvlink"`
	// NUMANodes are the distinct NUMA nodes of Devices (unknown nodes left out).
	NUMANodes []int `json:"numa_nodes"`
}

// CPU reports whether the placement has no GPU.
func (p Placement) CPU() bool { return len(p.Devices) == 0 }

// Indices lists the NVML indices of the chosen devices.
func (p Placement) Indices() []int {
	out := make([]int, len(p.Devices))
	for i, d := range p.Devices {
		out[i] = d.Index
	}
	return out
}

// UUIDs lists the UUIDs of the chosen devices.
func (p Placement) UUIDs() []string {
	out := make([]string, len(p.Devices))
	for i, d := range p.Devices {
		out[i] = d.UUID
	}
	return out
}

// Env is the environment the engine must start with, as KEY=VALUE: CUDA_VISIBLE_DEVICES by
// UUID, so that CUDA's own device order cannot pick other devices. It is nil on CPU.
func (p Placement) Env() []string {
	if p.CPU() {
		return nil
	}
	return []string{VisibleDevicesEnv + "=" + strings.Join(p.UUIDs(), ",")}
}

// String describes the placement in one line.
func (p Placement) String() string {
	if p.CPU() {
		return "CPU"
	}
	s := fmt.Sprintf("GPU %s, gpu_memory_utilization=%.2f (%s of %s per device for the model)",
		joinInts(p.Indices()), p.GPUMemoryUtilization, gib(p.NeedBytes), gib(p.BudgetBytes))
	if len(p.Devices) > 1 {
		if p.NVLink {
			s += ", NVLink"
		} else {
			s += ", no NVLink between all of them"
		}
		if len(p.NUMANodes) == 1 {
			s += fmt.Sprintf(", NUMA node %d", p.NUMANodes[0])
		} else if len(p.NUMANodes) > 1 {
			s += ", NUMA nodes " + joinInts(p.NUMANodes)
		}
	}
	return s
}

// FitError reports that the model does not fit: its Error names what the model needs and what
// the best devices have. It wraps [ErrInsufficientMemory].
type FitError struct {
	// ModelBytes and KVBytes are the request's; their sum is what the model needs.
	ModelBytes, KVBytes uint64
	// Devices are the indices of the best set (the most usable memory) of the requested size.
	Devices []int
	// FreeBytes is the free memory on Devices, summed.
	FreeBytes uint64
	// UsableBytes is what the engine could take on Devices after the headroom, summed.
	UsableBytes uint64
	// Headroom is the fraction of memory kept free.
	Headroom float64
}

// Error says what the model needs and what the best devices have, and what to do.
func (e *FitError) Error() string {
	what := fmt.Sprintf("the best %d GPUs (%s) have", len(e.Devices), joinInts(e.Devices))
	if len(e.Devices) == 1 {
		what = fmt.Sprintf("the best GPU (%d) has", e.Devices[0])
	}
	return fmt.Sprintf("gpu: model needs %s (%s weights + %s KV cache), %s %s free (%s usable with %.0f%% headroom): "+
		"free GPU memory, use more GPUs (--tensor-parallel-size), lower --max-model-len or pick a smaller model",
		gib(e.ModelBytes+e.KVBytes), gib(e.ModelBytes), gib(e.KVBytes), what, gib(e.FreeBytes), gib(e.UsableBytes),
		e.Headroom*100)
}

// Unwrap returns [ErrInsufficientMemory].
func (e *FitError) Unwrap() error { return ErrInsufficientMemory }

// Place chooses req.TensorParallel of devices for the model. Among the sets where the model
// fits it prefers, in order: all pairs NVLink-connected (more connected pairs first), fewer
// NUMA nodes, the most memory the engine may use on each device, the most free memory, lower
// indices. Devices outside CUDA_VISIBLE_DEVICES (when set) or outside req.GPUs are never
// chosen. With no devices (a CPU host), or CUDA_VISIBLE_DEVICES set to "", the placement is
// CPU, unless req.GPUs asks for GPUs. When the model fits nowhere the error is a [*FitError].
func Place(devices []Device, req Request) (Placement, error) {
	lookup := req.LookupEnv
	if lookup == nil {
		lookup = os.LookupEnv
	}
	headroom := req.Headroom
	switch {
	case headroom == 0:
		headroom = DefaultHeadroom
	case headroom < 0:
		headroom = 0
	case headroom >= 1:
		return Placement{}, fmt.Errorf("%w: headroom %.2f is not a fraction below 1", ErrBadRequest, req.Headroom)
	}
	maxUtil := req.MaxUtilization
	if maxUtil <= 0 || maxUtil > 1 {
		maxUtil = DefaultMaxUtilization
	}

	candidates := slices.Clone(devices)
	sort.Slice(candidates, func(i, j int) bool { return candidates[i].Index < candidates[j].Index })
	visible, set := lookup(VisibleDevicesEnv)
	if set {
		candidates = visibleDevices(candidates, visible)
	}
	if len(req.GPUs) > 0 {
		if len(candidates) == 0 {
			if len(devices) == 0 {
				return Placement{}, fmt.Errorf("%w: --gpus %s given, but this host has no NVIDIA GPU", ErrNoGPU, strings.Join(req.GPUs, ","))
			}
			return Placement{}, fmt.Errorf("%w: --gpus %s given, but %s=%q hides every GPU", ErrNoGPU, strings.Join(req.GPUs, ","), VisibleDevicesEnv, visible)
		}
		chosen, err := resolveAll(candidates, req.GPUs, "--gpus "+strings.Join(req.GPUs, ","))
		if err != nil {
			if set {
				err = fmt.Errorf("%w (only %s=%s are visible)", err, VisibleDevicesEnv, visible)
			}
			return Placement{}, err
		}
		candidates = chosen
		sort.Slice(candidates, func(i, j int) bool { return candidates[i].Index < candidates[j].Index })
	}
	if len(candidates) == 0 {
		return Placement{}, nil // CPU
	}

	tp := req.TensorParallel
	if tp <= 0 {
		tp = 1
		if len(req.GPUs) > 0 {
			tp = len(candidates)
		}
	}
	if tp > len(candidates) {
		where := fmt.Sprintf("this host has %d", len(candidates))
		switch {
		case len(req.GPUs) > 0:
			where = fmt.Sprintf("--gpus lists %d", len(candidates))
		case set:
			where = fmt.Sprintf("%s=%s shows %d", VisibleDevicesEnv, visible, len(candidates))
		}
		return Placement{}, fmt.Errorf("%w: tensor parallel size %d needs %d GPUs, %s", ErrTooFewGPUs, tp, tp, where)
	}

	total := req.ModelBytes + req.KVBytes
	need := (total + uint64(tp) - 1) / uint64(tp)
	var best, biggest *candidate
	forEachCombination(candidates, tp, func(set []Device) {
		c := score(set, headroom, maxUtil, need)
		if biggest == nil || c.budget > biggest.budget || (c.budget == biggest.budget && c.free > biggest.free) {
			biggest = c
		}
		if c.fits && (best == nil || c.better(best)) {
			best = c
		}
	})
	if best == nil {
		fe := &FitError{ModelBytes: req.ModelBytes, KVBytes: req.KVBytes, Headroom: headroom}
		for _, d := range biggest.set {
			fe.Devices = append(fe.Devices, d.Index)
			fe.FreeBytes += d.MemoryFree
		}
		fe.UsableBytes = biggest.budget * uint64(tp)
		return Placement{}, fe
	}
	p := Placement{
		Devices:              best.set,
		GPUMemoryUtilization: best.util,
		NeedBytes:            need,
		BudgetBytes:          best.budget,
		NVLink:               best.links == tp*(tp-1)/2,
		NUMANodes:            best.numa,
	}
	return p, nil
}

// candidate is one device set with its score.
type candidate struct {
	set    []Device
	fits   bool
	links  int   // NVLink-connected pairs
	numa   []int // distinct known NUMA nodes
	util   float64
	budget uint64 // bytes the engine may use on the smallest device
	free   uint64 // free bytes, summed
}

// better reports whether c beats o (both fit): NVLink pairs, then fewer NUMA nodes, then the
// budget per device, then total free memory. Ties keep o, the earlier (lower-index) set.
func (c *candidate) better(o *candidate) bool {
	if c.links != o.links {
		return c.links > o.links
	}
	if len(c.numa) != len(o.numa) {
		return len(c.numa) < len(o.numa)
	}
	if c.budget != o.budget {
		return c.budget > o.budget
	}
	return c.free > o.free
}

// score rates one set of devices for a per-device need.
func score(set []Device, headroom, maxUtil float64, need uint64) *candidate {
	c := &candidate{set: slices.Clone(set)}
	util := maxUtil
	var minTotal uint64 = math.MaxUint64
	nodes := map[int]bool{}
	for i, d := range set {
		c.free += d.MemoryFree
		if d.MemoryTotal > 0 {
			util = min(util, float64(d.MemoryFree)/float64(d.MemoryTotal)-headroom)
		} else {
			util = 0
		}
		minTotal = min(minTotal, d.MemoryTotal)
		if d.NUMANode >= 0 {
			nodes[d.NUMANode] = true
		}
		for _, e := range set[i+1:] {
			if slices.Contains(d.NVLinkPeers, e.Index) {
				c.links++
			}
		}
	}
	// Round down to hundredths, as a flag value would be written (and never above the free fraction).
	util = math.Floor(util*100+1e-9) / 100
	if util < 0 {
		util = 0
	}
	c.util = util
	c.budget = uint64(util * float64(minTotal))
	c.fits = util > 0 && c.budget >= need
	for n := range nodes {
		c.numa = append(c.numa, n)
	}
	sort.Ints(c.numa)
	return c
}

// forEachCombination calls fn with every k-subset of devs in lexicographic order, or, when
// there are too many, with the k devices that have the most free memory.
func forEachCombination(devs []Device, k int, fn func([]Device)) {
	if binomial(len(devs), k) > maxCombinations {
		top := slices.Clone(devs)
		sort.SliceStable(top, func(i, j int) bool { return top[i].MemoryFree > top[j].MemoryFree })
		top = top[:k]
		sort.Slice(top, func(i, j int) bool { return top[i].Index < top[j].Index })
		fn(top)
		return
	}
	idx := make([]int, k)
	for i := range idx {
		idx[i] = i
	}
	set := make([]Device, k)
	for {
		for i, j := range idx {
			set[i] = devs[j]
		}
		fn(set)
		i := k - 1
		for i >= 0 && idx[i] == len(devs)-k+i {
			i--
		}
		if i < 0 {
			return
		}
		idx[i]++
		for j := i + 1; j < k; j++ {
			idx[j] = idx[j-1] + 1
		}
	}
}

// binomial is n choose k, saturating above maxCombinations.
func binomial(n, k int) int {
	if k < 0 || k > n {
		return 0
	}
	r := 1
	for i := 1; i <= k; i++ {
		r = r * (n - k + i) / i
		if r > maxCombinations {
			return maxCombinations + 1
		}
	}
	return r
}

// resolveAll maps each entry (index, UUID or unique UUID prefix) to a device of devs, in order.
func resolveAll(devs []Device, entries []string, source string) ([]Device, error) {
	out := make([]Device, 0, len(entries))
	seen := map[int]bool{}
	for _, e := range entries {
		d, err := resolve(devs, e)
		if err != nil {
			return nil, fmt.Errorf("%w in %s", err, source)
		}
		if seen[d.Index] {
			return nil, fmt.Errorf("%w: GPU %d is listed twice in %s", ErrBadRequest, d.Index, source)
		}
		seen[d.Index] = true
		out = append(out, d)
	}
	return out, nil
}

// resolve finds one entry among devs.
func resolve(devs []Device, e string) (Device, error) {
	if e == "" {
		return Device{}, fmt.Errorf("%w: empty entry", ErrUnknownGPU)
	}
	if n, err := strconv.Atoi(e); err == nil {
		for _, d := range devs {
			if d.Index == n {
				return d, nil
			}
		}
		return Device{}, fmt.Errorf("%w: no GPU with index %d", ErrUnknownGPU, n)
	}
	if strings.HasPrefix(e, "MIG-") {
		return Device{}, fmt.Errorf("%w: MIG instance %s (placement works on whole GPUs)", ErrUnknownGPU, e)
	}
	var match []Device
	for _, d := range devs {
		if d.UUID == e {
			return d, nil
		}
		if strings.HasPrefix(d.UUID, e) {
			match = append(match, d)
		}
	}
	switch len(match) {
	case 1:
		return match[0], nil
	case 0:
		return Device{}, fmt.Errorf("%w: no GPU with UUID %q", ErrUnknownGPU, e)
	default:
		return Device{}, fmt.Errorf("%w: %q matches %d GPUs' UUIDs", ErrUnknownGPU, e, len(match))
	}
}

// visibleDevices applies CUDA_VISIBLE_DEVICES as CUDA does: the devices listed (by index, UUID
// or unique UUID prefix) up to the first entry that names none ("-1", a MIG instance, a typo).
func visibleDevices(devs []Device, value string) []Device {
	var out []Device
	seen := map[int]bool{}
	for _, e := range strings.Split(value, ",") {
		d, err := resolve(devs, strings.TrimSpace(e))
		if err != nil || seen[d.Index] {
			break
		}
		seen[d.Index] = true
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

// splitList splits a comma-separated list, dropping blanks.
func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// ParseGPUList parses a --gpus value ("0,1" or "GPU-…,GPU-…"); blanks are dropped.
func ParseGPUList(s string) []string { return splitList(s) }

// joinInts writes 0,1,2.
func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// gib formats bytes as "12.3 GiB".
func gib(b uint64) string { return fmt.Sprintf("%.1f GiB", float64(b)/GiB) }
