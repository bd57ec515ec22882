package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// metricValue reads one series ("name" or "name{labels}") from a server's /metrics.
func metricValue(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(?:\{[^}]*\})? (\S+)$`).FindSubmatch(b)
	require.NotNil(t, m, "%s not in /metrics", name)
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// scriptedStats asks the scripted backend for its counters.
func scriptedStats(t *testing.T, url string) (aborts, running int) {
	t.Helper()
	status, _, b := doScripted(t, http.MethodPost, "/v1/chat/completions", "",
		[]byte(`{"messages":[{"role":"user","content":"stats"}]}`))
	require.Equal(t, http.StatusOK, status, "%s", b)
	var c struct {
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
	}
	require.NoError(t, json.Unmarshal(b, &c))
	var v struct{ Aborts, Running int }
	require.NoError(t, json.Unmarshal([]byte(c.Choices[0].Message.Content), &v))
	return v.Aborts, v.Running
}

// TestScriptedSSEBytes checks the exact bytes of chat and text completion streams, and that
// the role chunk goes out with the first token.
func TestScriptedSSEBytes(t *testing.T) {
	const fp = `"system_fingerprint":"govllm-scripted"`
	chatHead := `{"id":"ID","object":"chat.completion.chunk","created":C,"model":"model","choices":`
	textHead := `{"id":"ID","object":"text_completion","created":C,"model":"model","choices":`
	content := func(s string) string {
		return `data: ` + chatHead + `[{"index":0,"delta":{"content":"` + s + `"},"logprobs":null,"finish_reason":null}]}`
	}
	text := func(s, finish, extra string) string {
		return `data: ` + textHead + `[{"index":0,"text":"` + s + `","logprobs":null,"finish_reason":` + finish + `,"stop_reason":null}]` + extra + `}`
	}
	tests := []struct {
		name, path, body string
		want             []string
	}{
		{
			name: "chat with usage",
			path: "/v1/chat/completions",
			body: `{"messages":[{"role":"user","content":"slow:3:40"}],"stream":true,"stream_options":{"include_usage":true}}`,
			want: []string{
				`data: ` + chatHead + `[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}`,
				content(" 0"), content(" 1"), content(" 2"),
				`data: ` + chatHead + `[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}`,
				`data: ` + chatHead + `[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12},` + fp + `}`,
				`data: [DONE]`,
			},
		},
		{
			name: "chat without usage, cut by max_tokens",
			path: "/v1/chat/completions",
			body: `{"messages":[{"role":"user","content":"slow:5:40"}],"stream":true,"max_tokens":2}`,
			want: []string{
				`data: ` + chatHead + `[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}`,
				content(" 0"), content(" 1"),
				`data: ` + chatHead + `[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length","stop_reason":null}],` + fp + `}`,
				`data: [DONE]`,
			},
		},
		{
			name: "text with echo and usage",
			path: "/v1/completions",
			body: `{"prompt":"slow:2:40","stream":true,"echo":true,"stream_options":{"include_usage":true}}`,
			want: []string{
				text(`slow:2:40 0`, "null", ""),
				text(` 1`, `"stop"`, ""),
				`data: ` + textHead + `[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11},` + fp + `}`,
				`data: [DONE]`,
			},
		},
	}
	idRe := regexp.MustCompile(`"id":"(chatcmpl|cmpl)-[0-9a-f]{16}"`)
	createdRe := regexp.MustCompile(`"created":\d+`)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(http.MethodPost, scripted.URL+tt.path, strings.NewReader(tt.body))
			require.NoError(t, err)
			req.Header.Set("Authorization", "Bearer "+scriptedKey)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
			br := bufio.NewReader(resp.Body)
			var got []string
			ids := map[string]bool{}
			for {
				line, err := br.ReadString('\n')
				if err == io.EOF {
					require.Empty(t, line)
					break
				}
				require.NoError(t, err)
				blank, err := br.ReadString('\n')
				require.NoError(t, err)
				require.Equal(t, "\n", blank, "events end with a blank line")
				if len(got) == 0 && strings.Contains(tt.path, "chat") {
					// The first token came in the same write as the role chunk.
					require.Positive(t, br.Buffered(), "role chunk sent alone, before the first token")
				}
				line = strings.TrimSuffix(line, "\n")
				if m := idRe.FindString(line); m != "" {
					ids[m] = true
				}
				line = idRe.ReplaceAllString(line, `"id":"ID"`)
				got = append(got, createdRe.ReplaceAllString(line, `"created":C`))
			}
			require.Equal(t, tt.want, got)
			require.Len(t, ids, 1, "one id per stream")
		})
	}
}

// TestThousandDisconnects opens 1,000 streams and hangs up on each after its first token: the
// engine sees 1,000 aborts, the running counts return to 0 within a second, and the server's
// goroutines return to where they were.
func TestThousandDisconnects(t *testing.T) {
	const n = 1000
	abortsBefore, _ := scriptedStats(t, scripted.URL)
	goroutinesBefore := metricValue(t, scripted.URL, "go_goroutines")
	tr := &http.Transport{MaxIdleConnsPerHost: -1}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	body := `{"messages":[{"role":"user","content":"slow:100000:200"}],"stream":true}`

	var started, wg sync.WaitGroup
	started.Add(n)
	release := make(chan struct{})
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			err := func() error {
				defer started.Done()
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, scripted.URL+"/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+scriptedKey)
				resp, err := client.Do(req)
				if err != nil {
					return err
				}
				if resp.StatusCode != http.StatusOK {
					return fmt.Errorf("status %d", resp.StatusCode)
				}
				br := bufio.NewReader(resp.Body)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return err
					}
					if strings.Contains(line, `"content":" 0"`) {
						return nil // mid-stream: the first token is in
					}
				}
			}()
			if err != nil {
				errs <- err
				return
			}
			<-release
			cancel() // hang up
		}()
	}
	started.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, float64(n), metricValue(t, scripted.URL, "govllm:num_requests_running"))
	close(release)
	wg.Wait()
	hungUp := time.Now()
	require.Eventually(t, func() bool {
		return metricValue(t, scripted.URL, "govllm:num_requests_running") == 0 &&
			metricValue(t, scripted.URL, "govllm:backend_num_requests_running") == 0
	}, time.Second, 10*time.Millisecond, "running requests back to 0 within 1 s")
	t.Logf("running requests at 0 %v after the last hang-up", time.Since(hungUp))

	aborts, running := scriptedStats(t, scripted.URL)
	require.Equal(t, abortsBefore+n, aborts, "one engine abort per stream")
	require.Zero(t, running)
	tr.CloseIdleConnections()
	require.Eventually(t, func() bool {
		return metricValue(t, scripted.URL, "go_goroutines") <= goroutinesBefore+5
	}, 10*time.Second, 50*time.Millisecond, "goroutines leaked: %v before", goroutinesBefore)
	t.Logf("goroutines: %v before, %v after", goroutinesBefore, metricValue(t, scripted.URL, "go_goroutines"))
}

// TestSIGTERMDuringStreams sends SIGTERM while 32 streams run: the short ones finish within the
// drain timeout, the rest end with finish_reason "abort" and [DONE], and the exit code is 0.
func TestSIGTERMDuringStreams(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv, err := startScripted(ctx, "--drain-timeout", "1s")
	require.NoError(t, err)
	defer func() {
		if t.Failed() {
			t.Logf("govllm log:\n%s", tail(srv.Output(), 20000))
		}
	}()
	const n = 32
	type result struct {
		long   bool
		finish string
		done   bool
		err    error
	}
	results := make(chan result, n)
	var firstTokens sync.WaitGroup
	firstTokens.Add(n)
	for i := range n {
		long := i%2 == 1
		cmd := "slow:10:50" // 0.5 s: finishes within the drain timeout
		if long {
			cmd = "slow:100000:50"
		}
		go func() {
			r := result{long: long}
			defer func() { results <- r }()
			first := false
			defer func() {
				if !first {
					firstTokens.Done()
				}
			}()
			body := fmt.Sprintf(`{"messages":[{"role":"user","content":%q}],"stream":true}`, cmd)
			resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
			if err != nil {
				r.err = err
				return
			}
			defer resp.Body.Close()
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				line, ok := strings.CutPrefix(sc.Text(), "data: ")
				if !ok {
					continue
				}
				if line == "[DONE]" {
					r.done = true
					continue
				}
				var c chunk
				if err := json.Unmarshal([]byte(line), &c); err != nil {
					r.err = err
					return
				}
				if !first && len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil && *c.Choices[0].Delta.Content != "" {
					first = true
					firstTokens.Done()
				}
				if len(c.Choices) > 0 && c.Choices[0].FinishReason != nil {
					r.finish = *c.Choices[0].FinishReason
				}
			}
			r.err = sc.Err()
		}()
	}
	firstTokens.Wait()
	term := time.Now()
	require.NoError(t, srv.Stop(30*time.Second), "exit code 0")
	t.Logf("exited %v after SIGTERM", time.Since(term))
	for range n {
		r := <-results
		require.NoError(t, r.err)
		require.True(t, r.done, "every stream ends with [DONE]")
		if r.long {
			require.Equal(t, "abort", r.finish)
		} else {
			require.Equal(t, "stop", r.finish)
		}
	}
	_, err = http.Get(srv.URL + "/health")
	require.Error(t, err, "nothing listens after the exit")
	require.Contains(t, srv.Output(), "aborting the requests in flight")
}
