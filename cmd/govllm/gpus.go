package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/launch"
	"github.com/govllm/govllm/server"
)

// gpusReport is `govllm gpus --json`: the devices and the plan serve would run.
type gpusReport struct {
	CPU     bool         `json:"cpu"`
	Message string       `json:"message,omitempty"`
	Driver  string       `json:"driver_version,omitempty"`
	Devices []gpu.Device `json:"devices"`
	Plan    *launch.Plan `json:"plan,omitempty"`
	Error   string       `json:"error,omitempty"`
}

// gpus is `govllm gpus`: the devices, and the launch plan serve would run with the same flags.
func gpus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm gpus", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	lf := addLaunchFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: govllm gpus [--json] [serve's engine and placement flags]\n\n"+
			"Lists the NVIDIA GPUs (through NVML) and the launch plan govllm serve would run with the same flags:\n"+
			"interpreter, engine (auto resolved), device, dtype, GPUs and the engine's arguments.\n\n")
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
	opts := lf.options(false)
	host := launch.Host{FindPython: findPython} // with --device cpu the plan lists no GPUs
	if opts.Device != "cpu" {
		h, err := openGPUs(log)
		if err != nil {
			rep.CPU, rep.Message = true, launch.CPUMessage(err)
			host.Devices = func() ([]gpu.Device, error) { return nil, err }
		} else {
			defer func() {
				if err := h.Close(); err != nil {
					log.Warn("govllm gpus: closing NVML", "err", err)
				}
			}()
			rep.Driver = h.DriverVersion()
			if rep.Devices, err = h.Devices(); err != nil {
				rep.Error = err.Error()
				return writeGPUs(stdout, stderr, rep, *asJSON, 1)
			}
			devs := rep.Devices
			host.Devices = func() ([]gpu.Device, error) { return devs, nil }
		}
	}
	if !*asJSON {
		if rep.CPU {
			fmt.Fprintln(stdout, rep.Message)
		} else if opts.Device != "cpu" {
			printDevices(stdout, rep.Driver, rep.Devices)
		}
	}
	plan, err := launch.Resolve(context.Background(), opts, host)
	if err != nil {
		rep.Error = err.Error()
		return writeGPUs(stdout, stderr, rep, *asJSON, 1)
	}
	rep.Plan = &plan
	rep.CPU = plan.Device == "cpu"
	if !*asJSON {
		printPlan(stdout, plan)
	}
	return writeGPUs(stdout, stderr, rep, *asJSON, 0)
}

// writeGPUs ends govllm gpus: the JSON report, or the error on stderr.
func writeGPUs(stdout, stderr io.Writer, rep gpusReport, asJSON bool, code int) int {
	if asJSON {
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

// printPlan writes the plan as text: what serve would run, why, and what it would export.
func printPlan(w io.Writer, p launch.Plan) {
	fmt.Fprintf(w, "\nplan: %s\n", p)
	fmt.Fprintf(w, "  python: %s (%s)\n", p.Python.Executable, p.Python.Version)
	if p.Model != nil && p.Model.SizeError == "" {
		fmt.Fprintf(w, "  model: %s: %s\n", p.Model.Dir, p.Model)
	}
	for _, n := range p.Notes {
		fmt.Fprintf(w, "  %s\n", n)
	}
	for _, k := range slices.Sorted(maps.Keys(p.EngineArgs)) {
		fmt.Fprintf(w, "  engine arg %s=%v\n", k, p.EngineArgs[k])
	}
	for _, e := range p.Env {
		fmt.Fprintf(w, "  export %s\n", e)
	}
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

// setupLaunch resolves serve's launch plan: NVML is opened only if the plan asks for the GPUs
// (not with --device cpu, nor when Ray places them), the model is placed before any weight is
// loaded, and the plan's environment (CUDA_VISIBLE_DEVICES) is exported. The returned setup
// keeps the NVML host for the monitor on GPU hosts.
func setupLaunch(ctx context.Context, log *slog.Logger, opts launch.Options) (*gpuSetup, launch.Plan, error) {
	s := &gpuSetup{}
	host := launch.Host{FindPython: findPython, Devices: func() ([]gpu.Device, error) {
		h, err := openGPUs(log)
		if err != nil {
			return nil, err
		}
		s.host = h
		return h.Devices()
	}}
	plan, err := launch.Resolve(ctx, opts, host)
	if err != nil {
		s.Close()
		return nil, plan, err
	}
	if plan.Placement == nil {
		s.Close() // CPU, or Ray's placement: no monitor
	} else {
		s.placement = *plan.Placement
	}
	for _, kv := range plan.Env {
		k, v, _ := strings.Cut(kv, "=")
		if err := os.Setenv(k, v); err != nil {
			s.Close()
			return nil, plan, fmt.Errorf("setting %s: %w", k, err)
		}
	}
	log.Info("govllm: launch plan", "plan", plan.String(), "python", plan.Python.Executable)
	for _, n := range plan.Notes {
		log.Info("govllm: plan: " + n)
	}
	return s, plan, nil
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
