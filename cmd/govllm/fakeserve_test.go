package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"
)

// fakeServeEnv makes the test binary act as `govllm serve` (for `server start` tests: the
// binary that start runs is os.Executable, this one): "ok" serves a tiny OpenAI API on --host/--port, "ignore-term" also
// ignores SIGTERM, "fail" exits 1 at once with an error on stderr.
const fakeServeEnv = "GOVLLM_TEST_FAKE_SERVE"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeServeEnv); mode != "" && len(os.Args) > 1 && os.Args[1] == "serve" {
		os.Exit(fakeServe(mode, os.Args[2:]))
	}
	os.Exit(m.Run())
}

func fakeServe(mode string, args []string) int {
	host, port := "127.0.0.1", "8000"
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "--host":
			host = args[i+1]
		case "--port":
			port = args[i+1]
		}
	}
	fmt.Fprintf(os.Stderr, "fake serve: %v\n", args)
	if mode == "fail" {
		fmt.Fprintln(os.Stderr, "govllm serve: boom: cannot import vllm")
		return 1
	}
	stopOn := []os.Signal{syscall.SIGTERM, os.Interrupt}
	if mode == "ignore-term" {
		// Notify would undo Ignore: listen for Interrupt alone.
		signal.Ignore(syscall.SIGTERM)
		stopOn = stopOn[1:]
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), stopOn...)
	defer stop()
	srv := &http.Server{Handler: fakeOpenAI("")}
	go func() { _ = srv.Serve(ln) }()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	fmt.Fprintln(os.Stderr, "fake serve: stopped")
	return 0
}

// fakeOpenAI answers /health, /v1/models and chat completions with four tokens; mode "drop"
// ends streams without [DONE], "500" fails completions.
func fakeOpenAI(mode string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {})
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, `{"object":"list","data":[{"id":"fake-model"}]}`)
	})
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Stream bool `json:"stream"`
		}
		_ = json.NewDecoder(r.Body).Decode(&body)
		if mode == "500" {
			w.WriteHeader(500)
			fmt.Fprint(w, `{"error":{"message":"the engine died","type":"InternalServerError","param":null,"code":500}}`)
			return
		}
		usage := `{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}`
		toks := []string{"Paris", " is", " the", " capital"}
		if !body.Stream {
			fmt.Fprintf(w, `{"choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital"},"finish_reason":"length"}],"usage":%s}`, usage)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for i, tok := range toks {
			if mode == "drop" && i == 2 {
				return
			}
			fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":%q},\"finish_reason\":null}]}\n\n", tok)
			w.(http.Flusher).Flush()
		}
		fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n")
		fmt.Fprintf(w, "data: {\"choices\":[],\"usage\":%s}\n\ndata: [DONE]\n\n", usage)
	})
	return mux
}
