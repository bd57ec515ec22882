package pyfind

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// The engine names govllm knows; a custom backend is "module:attr".
const (
	// Auto picks VLLM when the interpreter can import vllm, else Transformers.
	Auto = "auto"
	// VLLM is vLLM's AsyncLLM in the embedded interpreter.
	VLLM = "vllm"
	// Transformers is Hugging Face transformers' continuous batching.
	Transformers = "transformers"
)

// Engines lists the engine names a user may pass, "auto" first.
var Engines = []string{Auto, VLLM, Transformers}

// backendModules are the modules each named backend must be able to import.
var backendModules = map[string][]string{
	VLLM:         {"vllm"},
	Transformers: {"torch", "transformers"},
}

// CheckEngine reports whether name is an engine govllm can be asked for: one of Engines or a
// custom "module:attr".
func CheckEngine(name string) error {
	if slices.Contains(Engines, name) || IsCustom(name) {
		return nil
	}
	return fmt.Errorf("unknown engine %q: use --engine %s (or module:attr for a custom backend)", name, strings.Join(Engines, ", "))
}

// IsCustom reports whether name is a custom backend, "module:attr".
func IsCustom(name string) bool {
	mod, attr, ok := strings.Cut(name, ":")
	return ok && mod != "" && attr != ""
}

// RequiredModules are the modules the interpreter must import to run the engine name; nil for
// "auto" (which is decided from what it can import) and for custom backends.
func RequiredModules(name string) []string { return backendModules[name] }

// ProbeModules are the modules to ask an interpreter about to resolve name with ChooseBackend.
func ProbeModules(name string) []string {
	if name == Auto {
		return []string{"vllm", "torch", "transformers"}
	}
	return RequiredModules(name)
}

// ChooseBackend resolves name for the interpreter py (inspected with ProbeModules(name)): "auto"
// becomes VLLM when py can import vllm, else Transformers when it can import torch and
// transformers; any other name is returned as is once py can import what it needs.
func ChooseBackend(name string, py *PythonInfo) (string, error) {
	if err := CheckEngine(name); err != nil {
		return "", err
	}
	can := func(engine string) bool {
		for _, m := range backendModules[engine] {
			if _, missing := py.Missing[m]; missing {
				return false
			}
		}
		return true
	}
	if name != Auto {
		return name, nil
	}
	switch {
	case can(VLLM):
		return VLLM, nil
	case can(Transformers):
		return Transformers, nil
	}
	return "", fmt.Errorf("%w: %s can import neither vllm nor transformers+torch: run scripts/bootstrap, or point --python at a venv with vllm (GPU) or transformers and torch", ErrPythonNotFound, py.Executable)
}

// Find is FindPython for an engine name: the interpreter must import what the engine needs
// (nothing in particular for "auto"), and for "auto" the returned info's Missing says which
// of ProbeModules(Auto) it cannot import, ready for ChooseBackend.
func Find(ctx context.Context, explicit, engine string) (*PythonInfo, error) {
	py, err := FindPython(ctx, explicit, RequiredModules(engine)...)
	if err != nil || engine != Auto {
		return py, err
	}
	return InspectPython(ctx, py.Executable, ProbeModules(Auto)...)
}
