package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/server"
)

// openGPUs opens NVML; a seam for tests (which pass go-nvml's mock through gpu/gputest).
var openGPUs = func(log *slog.Logger) (*gpu.Host, error) {
	return gpu.Open(gpu.Config{Logger: log})
}

// gpuFlags are the placement flags shared by serve and gpus.
type gpuFlags struct {
	gpus     *string
	headroom *float64
}

func addGPUFlags(fs *flag.FlagSet) gpuFlags {
	return gpuFlags{
		gpus: fs.String("gpus", "", "GPUs to use, by nvidia-smi index or UUID, comma-separated "+
			"(default: the best --tensor-parallel-size of those CUDA_VISIBLE_DEVICES shows)"),
		headroom: fs.Float64("gpu-headroom", gpu.DefaultHeadroom,
			"fraction of each GPU's memory left unused when setting gpu_memory_utilization"),
	}
}

// modelNeeds is what a model asks of the GPUs, from its checkpoint.
type modelNeeds struct {
	Dir         string `json:"dir,omitempty"`
	WeightBytes uint64 `json:"weight_bytes"`
	KVBytes     uint64 `json:"kv_cache_bytes"`
	KVTokens    int    `json:"kv_cache_tokens"`
}

// estimateModel sizes the model in dir for dtype: its served weights plus a KV cache for one
// sequence of maxLen tokens (0: the model's context), or kvBytes when the user fixed it.
func estimateModel(dir, dtype string, maxLen int, kvBytes uint64) (modelNeeds, error) {
	n := modelNeeds{Dir: dir}
	if dir == "" {
		return n, nil
	}
	ck, err := gpu.ReadCheckpoint(dir)
	if err != nil {
		return n, err
	}
	n.WeightBytes = ck.ServedWeightBytes(dtype)
	if kvBytes > 0 {
		n.KVBytes = kvBytes
		return n, nil
	}
	n.KVTokens = maxLen
	if n.KVTokens <= 0 {
		n.KVTokens = ck.MaxPositions
	}
	n.KVBytes = ck.KVBytes(n.KVTokens, dtype)
	return n, nil
}

// String is "1.2 GiB weights + 0.3 GiB KV cache (8192 tokens)".
func (n modelNeeds) String() string {
	s := fmt.Sprintf("%.1f GiB weights + %.1f GiB KV cache", float64(n.WeightBytes)/gpu.GiB, float64(n.KVBytes)/gpu.GiB)
	if n.KVTokens > 0 {
		s += fmt.Sprintf(" (%d tokens)", n.KVTokens)
	}
	return s
}

// gpusReport is `govllm gpus --json`.
type gpusReport struct {
	CPU       bool           `json:"cpu"`
	Message   string         `json:"message,omitempty"`
	Driver    string         `json:"driver_version,omitempty"`
	Devices   []gpu.Device   `json:"devices"`
	Model     *modelNeeds    `json:"model,omitempty"`
	Placement *gpu.Placement `json:"placement,omitempty"`
	Env       []string       `json:"env,omitempty"`
	Error     string         `json:"error,omitempty"`
}

// gpus is `govllm gpus`: the devices, and what placement would pick.
func gpus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm gpus", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		asJSON      = fs.Bool("json", false, "print JSON instead of a table")
		model       = fs.String("model", "", "checkpoint directory to size the placement for (default: none, weights not counted)")
		tp          = fs.Int("tensor-parallel-size", 1, "GPUs to place the model on")
		maxModelLen = fs.Int("max-model-len", 0, "context length the KV cache must hold (default: the model's)")
		dtype       = fs.String("dtype", "auto", "weights dtype: auto, float32, bfloat16, float16")
		pf          = addGPUFlags(fs)
	)
	fs.IntVar(tp, "tensor-parallel", 1, "alias of --tensor-parallel-size")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: govllm gpus [--json] [--tensor-parallel-size N] [--model DIR] [--gpus LIST]\n\n"+
			"Lists the NVIDIA GPUs (through NVML) and the placement govllm serve would pick.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "govllm gpus: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	rep := gpusReport{Devices: []gpu.Device{}}
	write := func(code int) int {
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			if err := enc.Encode(rep); err != nil {
				fmt.Fprintf(stderr, "govllm gpus: %v\n", err)
				return 1
			}
			return code
		}
		if rep.Error != "" {
			fmt.Fprintf(stderr, "govllm gpus: %s\n", rep.Error)
		}
		return code
	}

	h, err := openGPUs(log)
	if err != nil {
		rep.CPU, rep.Message = true, cpuMessage(err)
		if !*asJSON {
			fmt.Fprintln(stdout, rep.Message)
		}
		if *pf.gpus != "" {
			rep.Error = fmt.Sprintf("--gpus %s: %v", *pf.gpus, err)
			return write(1)
		}
		return write(0)
	}
	defer func() {
		if err := h.Close(); err != nil {
			log.Warn("govllm gpus: closing NVML", "err", err)
		}
	}()
	rep.Driver = h.DriverVersion()
	if rep.Devices, err = h.Devices(); err != nil {
		rep.Error = err.Error()
		return write(1)
	}
	if !*asJSON {
		printDevices(stdout, rep.Driver, rep.Devices)
	}

	needs, err := estimateModel(*model, *dtype, *maxModelLen, 0)
	if err != nil {
		rep.Error = err.Error()
		return write(1)
	}
	if *model != "" {
		rep.Model = &needs
	}
	p, err := gpu.Place(rep.Devices, gpu.Request{
		TensorParallel: *tp, GPUs: gpu.ParseGPUList(*pf.gpus), Headroom: headroomFlag(*pf.headroom),
		ModelBytes: needs.WeightBytes, KVBytes: needs.KVBytes,
	})
	if err != nil {
		rep.Error = err.Error()
		return write(1)
	}
	rep.Placement, rep.Env = &p, p.Env()
	rep.CPU = p.CPU()
	if !*asJSON {
		what := fmt.Sprintf("--tensor-parallel-size %d", *tp)
		if *model != "" {
			what += fmt.Sprintf(", %s: %s", *model, needs)
		}
		fmt.Fprintf(stdout, "\nplacement (%s): %s\n", what, p)
		for _, e := range p.Env() {
			fmt.Fprintln(stdout, e)
		}
	}
	return write(0)
}

// printDevices writes the device table.
func printDevices(w io.Writer, driver string, devs []gpu.Device) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tNAME\tUUID\tMEMORY USED/TOTAL\tFREE\tUTIL\tTEMP\tPOWER\tPCI BUS ID\tNUMA\tNVLINK")
	for _, d := range devs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%.1f/%.1f GiB\t%.1f GiB\t%s\t%s\t%s\t%s\t%s\t%s\n",
			d.Index, d.Name, d.UUID, float64(d.MemoryUsed)/gpu.GiB, float64(d.MemoryTotal)/gpu.GiB,
			float64(d.MemoryFree)/gpu.GiB, orDash(d.UtilizationGPU, "%d%%"), orDash(d.TemperatureC, "%dC"),
			orDashF(d.PowerW, "%.0fW"), d.PCIBusID, orDash(d.NUMANode, "%d"), intList(d.NVLinkPeers))
	}
	_ = tw.Flush()
	if driver != "" {
		fmt.Fprintf(w, "driver %s\n", driver)
	}
}

// gpuSetup is serve's GPU state: the host (nil on CPU), the placement and the monitor.
type gpuSetup struct {
	host      *gpu.Host
	placement gpu.Placement
	monitor   *gpu.Monitor
}

// serveGPUOptions is what serve's flags say about GPUs.
type serveGPUOptions struct {
	flags       gpuFlags
	model       string
	engine      string
	device      string
	dtype       string
	maxModelLen int
	tp          int
	extra       map[string]any // engine arguments; gpu_memory_utilization is added for vllm
}

// setupGPUs runs placement before the engine loads anything: on a GPU host it picks the
// devices, exports CUDA_VISIBLE_DEVICES by UUID and, for vLLM, sets gpu_memory_utilization;
// when the model cannot fit it returns the error with the numbers. On CPU (no driver, no GPU,
// --device cpu) it logs one line and changes nothing.
func setupGPUs(log *slog.Logger, o serveGPUOptions) (*gpuSetup, error) {
	s := &gpuSetup{}
	list := gpu.ParseGPUList(*o.flags.gpus)
	if o.device == "cpu" {
		if len(list) > 0 {
			return nil, fmt.Errorf("--gpus %s contradicts --device cpu", *o.flags.gpus)
		}
		return s, nil
	}
	if backend, _ := o.extra["distributed_executor_backend"].(string); backend == "ray" {
		log.Info("govllm: GPU placement left to Ray (distributed_executor_backend=ray)")
		return s, nil
	}
	h, err := openGPUs(log)
	if err != nil {
		if len(list) > 0 {
			return nil, fmt.Errorf("--gpus %s: %w", *o.flags.gpus, err)
		}
		if errors.Is(err, gpu.ErrNoNVML) || errors.Is(err, gpu.ErrNoGPU) {
			log.Info("govllm: " + cpuMessage(err))
		} else {
			log.Warn("govllm: "+cpuMessage(err), "err", err)
		}
		return s, nil
	}
	s.host = h
	fail := func(err error) (*gpuSetup, error) {
		s.Close()
		return nil, err
	}
	devs, err := h.Devices()
	if err != nil {
		return fail(err)
	}
	world := o.tp
	if world <= 0 {
		world = intArg(o.extra, "tensor_parallel_size")
	}
	if pp := intArg(o.extra, "pipeline_parallel_size"); pp > 1 {
		world = max(world, 1) * pp
	}
	if world <= 0 && len(list) == 0 {
		world = 1
	}
	var kvFixed uint64
	if n := intArg(o.extra, "kv_cache_memory_bytes"); n > 0 {
		kvFixed = uint64(n) * uint64(max(world, len(list), 1))
	}
	needs, err := estimateModel(o.model, o.dtype, o.maxModelLen, kvFixed)
	if err != nil {
		// A missing model is reported by engine.Open, with its fix.
		log.Debug("govllm: cannot size the model for placement", "err", err)
	}
	p, err := gpu.Place(devs, gpu.Request{
		TensorParallel: world, GPUs: list, Headroom: headroomFlag(*o.flags.headroom),
		ModelBytes: needs.WeightBytes, KVBytes: needs.KVBytes,
	})
	if err != nil {
		return fail(err)
	}
	s.placement = p
	if p.CPU() {
		log.Info("govllm: no GPU visible (CUDA_VISIBLE_DEVICES); running on CPU")
		s.Close()
		return &gpuSetup{}, nil
	}
	for _, kv := range p.Env() {
		k, v, _ := strings.Cut(kv, "=")
		if err := os.Setenv(k, v); err != nil {
			return fail(fmt.Errorf("setting %s: %w", k, err))
		}
	}
	if _, set := o.extra["gpu_memory_utilization"]; !set && o.engine == "vllm" {
		o.extra["gpu_memory_utilization"] = p.GPUMemoryUtilization
	}
	log.Info("govllm: GPU placement", "gpus", p.String(), "model", needs.String(), gpu.VisibleDevicesEnv, os.Getenv(gpu.VisibleDevicesEnv))
	return s, nil
}

// startMonitor starts the GPU gauges and health watchdog over the placement's devices; a no-op on CPU.
func (s *gpuSetup) startMonitor(ctx context.Context) {
	if s.host == nil {
		return
	}
	s.monitor = s.host.StartMonitor(ctx, gpu.MonitorConfig{Devices: s.placement.Indices()})
}

// collectors are the GPU gauges for /metrics (none on CPU).
func (s *gpuSetup) collectors() []prometheus.Collector {
	if s.monitor == nil {
		return nil
	}
	return []prometheus.Collector{s.monitor}
}

// healthChecks are the GPU health checks for /health (none on CPU).
func (s *gpuSetup) healthChecks() []server.HealthChecker {
	if s.monitor == nil {
		return nil
	}
	return []server.HealthChecker{s.monitor}
}

// Close stops the monitor and shuts NVML down.
func (s *gpuSetup) Close() {
	if s.monitor != nil {
		s.monitor.Close()
		s.monitor = nil
	}
	if s.host != nil {
		_ = s.host.Close()
		s.host = nil
	}
}

// cpuMessage is the one line saying why govllm runs on CPU.
func cpuMessage(err error) string {
	switch {
	case errors.Is(err, gpu.ErrNoNVML):
		return gpu.NoDriverMessage
	case errors.Is(err, gpu.ErrNoGPU):
		return "no NVIDIA GPU found; running on CPU"
	default:
		return fmt.Sprintf("NVML unavailable (%v); running on CPU", err)
	}
}

// headroomFlag maps --gpu-headroom (0: none) to gpu.Request.Headroom (0: the default).
func headroomFlag(f float64) float64 {
	if f == 0 {
		return -1
	}
	return f
}

// intArg reads an integer engine argument (JSON numbers arrive as float64); 0 when absent.
func intArg(extra map[string]any, key string) int {
	switch v := extra[key].(type) {
	case float64:
		return int(v)
	case int:
		return v
	case string:
		n, _ := strconv.Atoi(v)
		return n
	}
	return 0
}

func orDash(v int, format string) string {
	if v < 0 {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func orDashF(v float64, format string) string {
	if v < 0 {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func intList(xs []int) string {
	if len(xs) == 0 {
		return "-"
	}
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}
