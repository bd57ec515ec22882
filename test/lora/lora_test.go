// Package lora is the end-to-end test of LoRA adapters (--lora-modules): an adapter made offline
// with seeded random weights (scripts/make_lora_adapter.py) on the default model, served by one
// govllm per backend (vLLM's LoRA with --max-loras 2; PEFT-loaded weights on transformers). A
// greedy completion on the adapter differs from the base model's and equals PEFT's own generate
// (reference.py), /v1/models lists the adapter with its parent, and base and adapter requests
// interleaved concurrently each answer as alone.
package lora

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

const (
	model     = "SmolLM2-135M-Instruct"
	adapter   = "smol-lora"
	maxTokens = 12
)

// prompts are the completions compared with PEFT's generate.
var prompts = []string{"The capital of France is", "Once upon a time, there was a"}

// server is one govllm binary under test.
type server = govtest.Backend

var (
	servers []server
	// ref is reference.py's answer: the greedy texts of the base model and of the adapter.
	ref struct {
		Base    []string `json:"base"`
		Adapter []string `json:"adapter"`
	}
	adapterDir string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if _, err := os.Stat(govtest.Model(model)); err != nil {
		fmt.Fprintln(os.Stderr, "test/lora: the default model is missing: run scripts/bootstrap")
		return 1
	}
	if exec.Command(govtest.VenvPython(), "-c", "import peft").Run() != nil {
		fmt.Fprintln(os.Stderr, "test/lora: the venv cannot import peft (scripts/requirements.lock pins it)")
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "govllm-lora-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	adapterDir = filepath.Join(dir, "adapter")
	mk := exec.CommandContext(ctx, govtest.VenvPython(), filepath.Join(govtest.RepoRoot(), "scripts", "make_lora_adapter.py"),
		"--model", govtest.Model(model), "--out", adapterDir, "--seed", "0")
	if out, err := mk.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "test/lora: make the adapter: %v\n%s\n", err, out)
		return 1
	}
	bin, err := govtest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/lora:", err)
		return 1
	}
	// PEFT's reference runs while the servers load.
	var wg sync.WaitGroup
	var refErr error
	wg.Go(func() {
		in, _ := json.Marshal(map[string]any{"model": govtest.Model(model), "adapter": adapterDir, "prompts": prompts, "max_tokens": maxTokens})
		refCmd := exec.CommandContext(ctx, govtest.VenvPython(), "reference.py")
		refCmd.Stdin = bytes.NewReader(in)
		refCmd.Stderr = os.Stderr
		out, err := refCmd.Output()
		if err == nil {
			err = json.Unmarshal(out, &ref)
		}
		refErr = err
	})
	started, ok := govtest.StartBackends(ctx, "test/lora", bin, dir, govtest.Engines("test/lora"), func(engine string) []string {
		args := []string{"--engine", engine, "--model", govtest.Model(model), "--python", govtest.VenvPython(),
			"--device", "cpu", "--dtype", "float32", "--max-model-len", "2048",
			"--lora-modules", adapter + "=" + adapterDir,
			"--lora-modules", `{"name":"smol-lora-2","path":"` + adapterDir + `"}`}
		if engine == "vllm" {
			args = append(args, "--max-loras", "2")
		}
		return args
	})
	servers = started
	wg.Wait()
	if refErr != nil {
		fmt.Fprintf(os.Stderr, "test/lora: reference.py: %v\n", refErr)
		ok = false
	}
	code := 1
	if ok {
		code = m.Run()
	}
	code = govtest.StopBackends("test/lora", servers, code)
	return code
}

func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.Name, func(t *testing.T) { f(t, s) })
	}
}

// complete posts a greedy completion and returns the status, the text (the error's param when
// not 200) and the response's model.
func complete(t *testing.T, s server, modelName, prompt string) (int, string, string) {
	t.Helper()
	code, text, m, err := post(s, modelName, prompt)
	require.NoError(t, err)
	return code, text, m
}

// post is complete without the test: safe on any goroutine.
func post(s server, modelName, prompt string) (int, string, string, error) {
	body, _ := json.Marshal(map[string]any{"model": modelName, "prompt": prompt, "max_tokens": maxTokens, "temperature": 0})
	resp, err := http.Post(s.URL+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", "", err
	}
	var out struct {
		Model   string `json:"model"`
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
		Error struct {
			Param string `json:"param"`
		} `json:"error"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return 0, "", "", fmt.Errorf("%w: %s", err, raw)
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, out.Error.Param, "", nil
	}
	if len(out.Choices) != 1 {
		return 0, "", "", fmt.Errorf("want 1 choice: %s", raw)
	}
	return resp.StatusCode, out.Choices[0].Text, out.Model, nil
}

func TestAdapterEqualsPEFT(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		for i, p := range prompts {
			require.NotEqual(t, ref.Base[i], ref.Adapter[i], "the adapter must change the greedy output of %q", p)
			code, base, m := complete(t, s, model, p)
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, model, m)
			require.Equal(t, ref.Base[i], base, "base model, prompt %q", p)
			for _, name := range []string{adapter, "smol-lora-2"} {
				code, text, m := complete(t, s, name, p)
				require.Equal(t, http.StatusOK, code)
				require.Equal(t, name, m, "the response names the adapter")
				require.Equal(t, ref.Adapter[i], text, "adapter %s, prompt %q", name, p)
			}
		}
	})
}

func TestModelsListAdapters(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		resp, err := http.Get(s.URL + "/v1/models")
		require.NoError(t, err)
		defer resp.Body.Close()
		var list struct {
			Data []struct {
				ID     string `json:"id"`
				Root   string `json:"root"`
				Parent string `json:"parent"`
			} `json:"data"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&list))
		require.Len(t, list.Data, 3)
		require.Equal(t, model, list.Data[0].ID)
		require.Empty(t, list.Data[0].Parent)
		for i, name := range []string{adapter, "smol-lora-2"} {
			require.Equal(t, name, list.Data[i+1].ID)
			require.Equal(t, model, list.Data[i+1].Parent)
			require.Equal(t, adapterDir, list.Data[i+1].Root)
		}
	})
}

func TestUnknownAdapterIs404(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		code, param, _ := complete(t, s, "no-such-lora", prompts[0])
		require.Equal(t, http.StatusNotFound, code)
		require.Equal(t, "model", param)
	})
}

func TestInterleavedBaseAndAdapter(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		type job struct {
			model string
			i     int
		}
		var jobs []job
		for r := 0; r < 3; r++ {
			for i := range prompts {
				jobs = append(jobs, job{model, i}, job{adapter, i}, job{"smol-lora-2", i})
			}
		}
		texts := make([]string, len(jobs))
		codes := make([]int, len(jobs))
		errs := make([]error, len(jobs))
		var wg sync.WaitGroup
		for k, j := range jobs {
			wg.Go(func() { codes[k], texts[k], _, errs[k] = post(s, j.model, prompts[j.i]) })
		}
		wg.Wait()
		for k, j := range jobs {
			require.NoError(t, errs[k])
			require.Equal(t, http.StatusOK, codes[k])
			want := ref.Adapter[j.i]
			if j.model == model {
				want = ref.Base[j.i]
			}
			require.Equal(t, want, texts[k], "%s on %q among concurrent requests", j.model, prompts[j.i])
		}
	})
}
