package engine

import (
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The command kinds, event kinds and finish codes are written down three times: in
// cshim/shim.h (SHIM_CMD_*, SHIM_EV_*, SHIM_FINISH_*), in Go (cmd*, ev*, finishReasons) and in
// the bridge (CMD_*, EV_*, FINISH_CODES). TestCodesAgree reads the C header and the Python
// source and compares both with the Go constants, by name (CMD_SUBMIT is SHIM_CMD_SUBMIT, cmdSubmit
// and bridge.CMD_SUBMIT; FINISH_STOP is finishReasons' "stop" and FINISH_CODES["stop"]).

// goCodes is the Go side, keyed as in C without the SHIM_ prefix.
func goCodes() map[string]int {
	m := map[string]int{
		"CMD_SUBMIT": cmdSubmit, "CMD_ABORT": cmdAbort, "CMD_SHUTDOWN": cmdShutdown, "CMD_STATS": cmdStats,
		"CMD_STOP_CHOICE": cmdStopChoice, "EV_PROMPT": evPrompt, "CMD_PARSE": cmdParse, "EV_PARSED": evParsed,
		"EV_DELTA": evDelta, "EV_END": evEnd, "EV_ERROR": evError, "EV_READY": evReady, "EV_FATAL": evFatal,
		"EV_LOG": evLog, "EV_STATS": evStats,
		"CMD_EMBED": cmdEmbed, "EV_EMBEDDING": evEmbedding,
	}
	for code, reason := range finishReasons {
		m["FINISH_"+finishName(reason)] = code
	}
	return m
}

// finishName is a finish reason's name in the codes: "" (a delta that ends nothing) is NONE.
func finishName(reason string) string {
	if reason == "" {
		return "NONE"
	}
	return strings.ToUpper(reason)
}

// cCodes parses the SHIM_* enumerators of shim.h.
func cCodes(t *testing.T, header string) map[string]int {
	m := map[string]int{}
	for _, sm := range regexp.MustCompile(`(?m)^\s*SHIM_((?:CMD|EV|FINISH)_[A-Z0-9_]+)\s*=\s*(\d+)\s*,`).FindAllStringSubmatch(header, -1) {
		v, err := strconv.Atoi(sm[2])
		require.NoError(t, err)
		require.NotContains(t, m, sm[1], "shim.h defines %s twice", sm[1])
		m[sm[1]] = v
	}
	return m
}

// pythonCodes parses the bridge's module-level CMD_* and EV_* assignments (`A = 1` and
// `A, B = 1, 2`) and its FINISH_CODES dict (keyed FINISH_<REASON>, None being NONE).
func pythonCodes(t *testing.T, src string) map[string]int {
	m := map[string]int{}
	assign := regexp.MustCompile(`^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=\s*([^#]*?)\s*(?:#.*)?$`)
	entry := regexp.MustCompile(`(None|"\w*"|'\w*')\s*:\s*(\d+)`)
	sawFinish := false
	for _, line := range strings.Split(src, "\n") {
		sm := assign.FindStringSubmatch(line) // module level only: indented lines do not match
		if sm == nil {
			continue
		}
		names := splitTrim(sm[1])
		if names[0] == "FINISH_CODES" {
			sawFinish = true
			for _, e := range entry.FindAllStringSubmatch(sm[2], -1) {
				reason := strings.Trim(e[1], `"'`)
				if e[1] == "None" {
					reason = ""
				}
				v, err := strconv.Atoi(e[2])
				require.NoError(t, err)
				m["FINISH_"+finishName(reason)] = v
			}
			continue
		}
		if !strings.HasPrefix(names[0], "CMD_") && !strings.HasPrefix(names[0], "EV_") {
			continue
		}
		values := splitTrim(sm[2])
		require.Len(t, values, len(names), "bridge.py: %q", line)
		for i, name := range names {
			v, err := strconv.Atoi(values[i])
			require.NoError(t, err, "bridge.py: %s is not an int literal in %q", name, line)
			require.NotContains(t, m, name, "bridge.py assigns %s twice", name)
			m[name] = v
		}
	}
	require.True(t, sawFinish, "bridge.py has no FINISH_CODES line")
	return m
}

func splitTrim(s string) []string {
	parts := strings.Split(s, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return parts
}

// goConstNames returns the package's cmd* and ev* constants as C names (cmdSubmit: CMD_SUBMIT),
// so that a new Go constant missing from goCodes fails the test too.
func goConstNames(t *testing.T) []string {
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	var names []string
	camel := regexp.MustCompile(`^(cmd|ev)[A-Z]\w*$`)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		require.NoError(t, err)
		for _, d := range file.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				for _, id := range spec.(*ast.ValueSpec).Names {
					if camel.MatchString(id.Name) {
						names = append(names, strings.ToUpper(regexp.MustCompile(`([a-z0-9])([A-Z])`).ReplaceAllString(id.Name, "${1}_${2}")))
					}
				}
			}
		}
	}
	return names
}

func readRepoFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", filepath.FromSlash(rel)))
	require.NoError(t, err)
	return string(b)
}

func TestCodesAgree(t *testing.T) {
	goc := goCodes()
	for _, name := range goConstNames(t) {
		require.Contains(t, goc, name, "a Go constant missing from goCodes in codes_test.go")
	}
	header := readRepoFile(t, "cshim/shim.h")
	c := cCodes(t, header)
	require.Equal(t, goc, c, "the Go constants (expected) and cshim/shim.h (actual) disagree")

	py := pythonCodes(t, readRepoFile(t, "engine/python/govllm/bridge.py"))
	for _, name := range slices.Sorted(maps.Keys(py)) {
		want, ok := c[name]
		require.True(t, ok, "bridge.py defines %s, which cshim/shim.h does not", name)
		require.Equal(t, want, py[name], "bridge.py's %s and cshim/shim.h's SHIM_%s disagree", name, name)
	}
	for _, name := range slices.Sorted(maps.Keys(c)) {
		if name == "EV_DELTA" {
			continue // the bridge's deltas go through shim.emit, which writes the kind itself
		}
		require.Contains(t, py, name, "bridge.py lacks %s (SHIM_%s in cshim/shim.h)", name, name)
	}

	// shim.c writes kinds and finish codes by name; a literal in a header would escape this test.
	shimC := readRepoFile(t, "cshim/shim.c")
	require.NotRegexp(t, `make_header\(\s*\w+\s*,\s*\d`, shimC, "shim.c: make_header with a literal kind: use SHIM_EV_*")
	// The record layout and the queue cap, which Go also hard-codes.
	hdr := regexp.MustCompile(`enum \{ HDR = (\d+) \}`).FindStringSubmatch(shimC)
	require.NotNil(t, hdr, "shim.c: no HDR")
	require.Equal(t, strconv.Itoa(headerSize), hdr[1], "headerSize and shim.c's HDR disagree")
	maxQ := regexp.MustCompile(`#define SHIM_MAX_QUEUE_BYTES \(\(int64_t\)1 << (\d+)\)`).FindStringSubmatch(header)
	require.NotNil(t, maxQ, "shim.h: no SHIM_MAX_QUEUE_BYTES")
	shift, err := strconv.Atoi(maxQ[1])
	require.NoError(t, err)
	require.EqualValues(t, int64(1)<<shift, maxQueueBytes, "maxQueueBytes and shim.h's SHIM_MAX_QUEUE_BYTES disagree")
}

// TestPythonCodesParser: both forms of assignment the bridge uses, comments, and indented
// lines (not module level) ignored.
func TestPythonCodesParser(t *testing.T) {
	got := pythonCodes(t, `
CMD_SUBMIT, CMD_ABORT = 1, 2  # commands
EV_DELTA = 1
EV_END=2
def f():
    EV_LOG = 99
FINISH_CODES = {None: 0, "stop": 1, 'length': 2}
HEALTH_INTERVAL = 0.25
`)
	require.Equal(t, map[string]int{
		"CMD_SUBMIT": 1, "CMD_ABORT": 2, "EV_DELTA": 1, "EV_END": 2,
		"FINISH_NONE": 0, "FINISH_STOP": 1, "FINISH_LENGTH": 2,
	}, got)
}
