package govtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"time"
)

// Backend is one govllm server a test binary started, named for what it serves (its engine,
// or a role such as "reasoning").
type Backend struct {
	Name string
	URL  string
	Srv  *Server
}

// Engines lists the backends an end-to-end package tests: vllm when the venv can import it,
// then transformers. pkg names the package in the note printed when vllm is missing.
func Engines(pkg string) []string {
	if exec.Command(VenvPython(), "-c", "import vllm").Run() == nil {
		return []string{"vllm", "transformers"}
	}
	fmt.Printf("%s: the venv cannot import vllm: the vllm backend is not tested\n", pkg)
	return []string{"transformers"}
}

// StartBackends starts `bin serve args(name)...` for every name side by side (the model loads
// take most of the time) and waits for all of them. It returns the servers that started, in the
// order of names, and reports each failure on stderr (pkg prefixes the lines); ok is false when
// any failed. The caller stops the servers with [StopBackends] either way.
func StartBackends(ctx context.Context, pkg, bin, dir string, names []string, args func(name string) []string) (started []Backend, ok bool) {
	all := make([]Backend, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Go(func() {
			srv, err := Start(ctx, bin, dir, args(name)...)
			all[i], errs[i] = Backend{Name: name, Srv: srv}, err
			if srv != nil {
				all[i].URL = srv.URL
			}
		})
	}
	wg.Wait()
	ok = true
	for i, err := range errs {
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: start govllm (%s): %v\n", pkg, names[i], err)
			ok = false
		} else {
			started = append(started, all[i])
		}
	}
	return started, ok
}

// StopBackends stops every server and returns the test binary's exit code: code, or 1 when a
// server exited badly. When the code is not 0 it prints the tail of each server's log.
func StopBackends(pkg string, backends []Backend, code int) int {
	for _, b := range backends {
		if err := b.Srv.Stop(time.Minute); err != nil && code == 0 {
			fmt.Fprintf(os.Stderr, "%s: govllm (%s) exit: %v\n", pkg, b.Name, err)
			code = 1
		}
		if code != 0 {
			fmt.Fprintf(os.Stderr, "--- govllm (%s) log ---\n%s\n", b.Name, Tail(b.Srv.Output(), 20000))
		}
	}
	return code
}

// Tail is the last n bytes of s.
func Tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
