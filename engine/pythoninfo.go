package engine

import "github.com/govllm/govllm/internal/pyfind"

// PythonInfo describes the embedded interpreter: its executable, version, shared libpython and
// sys.path, as the interpreter reported them.
type PythonInfo = pyfind.PythonInfo
