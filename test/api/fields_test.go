package api

import (
	"bytes"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// The vLLM extensions of chat and completions (README "vLLM's extensions of chat and
// completions") on the real binary, both backends.

// systemPrompt is what the shipped template writes when the messages have no system message.
const systemPrompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

// prefilled is a conversation whose assistant turn the model is asked to continue.
var prefilled = []map[string]any{
	{"role": "user", "content": "Count from one to ten in words."},
	{"role": "assistant", "content": "one, two, three,"},
}

// prefilledText is prefilled rendered open, as the template renders it without the end of turn.
const prefilledText = systemPrompt + "<|im_start|>user\nCount from one to ten in words.<|im_end|>\n" +
	"<|im_start|>assistant\none, two, three,"

// post sends body to path on s and decodes the JSON answer into out; it returns the status.
func post(t *testing.T, s server, path string, body map[string]any, out any) int {
	t.Helper()
	data, err := json.Marshal(body)
	require.NoError(t, err)
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.URL+path, bytes.NewReader(data))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 5 * time.Minute}).Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	if out != nil {
		require.NoError(t, json.Unmarshal(raw, out), "%s", raw)
	}
	return resp.StatusCode
}

// postStream sends a streamed request and returns its data lines.
func postStream(t *testing.T, s server, path string, body map[string]any) []string {
	t.Helper()
	data, err := json.Marshal(body)
	require.NoError(t, err)
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.URL+path, bytes.NewReader(data))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := (&http.Client{Timeout: 5 * time.Minute}).Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	return govtest.SSEData(t, resp.Body)
}

type chatAnswer struct {
	Choices []struct {
		Message struct {
			Role    string  `json:"role"`
			Content *string `json:"content"`
		} `json:"message"`
	} `json:"choices"`
	PromptTokenIDs []int32           `json:"prompt_token_ids"`
	PromptLogprobs []json.RawMessage `json:"prompt_logprobs"`
	Error          *struct {
		Param string `json:"param"`
	} `json:"error"`
}

type promptEntry struct {
	Logprob      float64 `json:"logprob"`
	Rank         int     `json:"rank"`
	DecodedToken string  `json:"decoded_token"`
}

type textAnswer struct {
	Choices []struct {
		Text     string `json:"text"`
		Logprobs *struct {
			Tokens        []string             `json:"tokens"`
			TokenLogprobs []*float64           `json:"token_logprobs"`
			TopLogprobs   []map[string]float64 `json:"top_logprobs"`
			TextOffset    []int                `json:"text_offset"`
		} `json:"logprobs"`
		PromptTokenIDs []int32                  `json:"prompt_token_ids"`
		PromptLogprobs []map[string]promptEntry `json:"prompt_logprobs"`
		TokenIDs       []int32                  `json:"token_ids"`
	} `json:"choices"`
}

func TestFieldsContinueFinalMessage(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		var chat chatAnswer
		require.Equal(t, 200, post(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": prefilled, "max_tokens": 8, "temperature": 0,
			"add_generation_prompt": false, "continue_final_message": true, "return_token_ids": true,
		}, &chat))
		var text textAnswer
		require.Equal(t, 200, post(t, s, "/v1/completions", map[string]any{
			"model": model, "prompt": prefilledText, "max_tokens": 8, "temperature": 0, "return_token_ids": true,
		}, &text))
		// The rendered prompt ends inside the assistant message: exactly the open text.
		require.Equal(t, text.Choices[0].PromptTokenIDs, chat.PromptTokenIDs)
		// And the output continues it, as a completion of that text does.
		require.NotNil(t, chat.Choices[0].Message.Content)
		require.Equal(t, text.Choices[0].Text, *chat.Choices[0].Message.Content)
		require.NotEmpty(t, text.Choices[0].Text)
		// Without a generation prompt the response's role is the last message's.
		require.Equal(t, "assistant", chat.Choices[0].Message.Role)

		// The default renders a new assistant turn after the prefilled one.
		var fresh chatAnswer
		require.Equal(t, 200, post(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": prefilled, "max_tokens": 1, "return_token_ids": true,
		}, &fresh))
		require.Greater(t, len(fresh.PromptTokenIDs), len(chat.PromptTokenIDs))

		// echo: the prefilled message leads the content, streamed as a chunk of its own.
		var echoed chatAnswer
		require.Equal(t, 200, post(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": prefilled, "max_tokens": 8, "temperature": 0,
			"add_generation_prompt": false, "continue_final_message": true, "echo": true,
		}, &echoed))
		require.Equal(t, "one, two, three,"+*chat.Choices[0].Message.Content, *echoed.Choices[0].Message.Content)
		require.Len(t, echoed.PromptLogprobs, len(chat.PromptTokenIDs), "echo asks for prompt logprobs, as vLLM")
		lines := postStream(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": prefilled, "max_tokens": 8, "temperature": 0, "stream": true,
			"add_generation_prompt": false, "continue_final_message": true, "echo": true,
		})
		var contents []string
		for _, l := range lines[:len(lines)-1] {
			var c struct {
				Choices []struct {
					Delta struct {
						Content *string `json:"content"`
					} `json:"delta"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal([]byte(l), &c))
			if len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil && *c.Choices[0].Delta.Content != "" {
				contents = append(contents, *c.Choices[0].Delta.Content)
			}
		}
		require.NotEmpty(t, contents)
		require.Equal(t, "one, two, three,", contents[0])
		require.Equal(t, *echoed.Choices[0].Message.Content, strings.Join(contents, ""))

		// Both at once is vLLM's 400.
		var bad chatAnswer
		require.Equal(t, 400, post(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": prefilled, "continue_final_message": true, "add_generation_prompt": true,
		}, &bad))
		require.Equal(t, "continue_final_message", bad.Error.Param)
	})
}

const logprobsPrompt = "The capital of France is Paris, and the capital of Italy is"

// promptLogprobs asks s for the prompt logprobs of logprobsPrompt.
func promptLogprobs(t *testing.T, s server) textAnswer {
	t.Helper()
	var out textAnswer
	require.Equal(t, 200, post(t, s, "/v1/completions", map[string]any{
		"model": model, "prompt": logprobsPrompt, "max_tokens": 1, "prompt_logprobs": 3, "return_token_ids": true,
	}, &out))
	return out
}

func TestFieldsPromptLogprobs(t *testing.T) {
	got := map[string]textAnswer{}
	forEach(t, func(t *testing.T, s server) {
		out := promptLogprobs(t, s)
		ch := out.Choices[0]
		ids := ch.PromptTokenIDs
		require.Len(t, ch.PromptLogprobs, len(ids))
		require.Nil(t, ch.PromptLogprobs[0], "the first prompt token has no logprob")
		for i := 1; i < len(ids); i++ {
			pos := ch.PromptLogprobs[i]
			own, ok := pos[jsonID(ids[i])]
			require.True(t, ok, "position %d lacks its prompt token %d: %v", i, ids[i], pos)
			require.LessOrEqual(t, own.Logprob, 0.0)
			require.GreaterOrEqual(t, own.Rank, 1)
			require.True(t, len(pos) == 3 || len(pos) == 4, "the prompt token and the top 3: %v", pos)
			ranks := map[int]bool{}
			for _, e := range pos {
				ranks[e.Rank] = true
			}
			for r := 1; r <= 3; r++ {
				require.True(t, ranks[r], "position %d lacks rank %d", i, r)
			}
		}
		// Chat puts them at the top of the answer.
		var chat chatAnswer
		require.Equal(t, 200, post(t, s, "/v1/chat/completions", map[string]any{
			"model": model, "messages": []map[string]any{{"role": "user", "content": "hi"}}, "max_tokens": 1,
			"prompt_logprobs": 0, "return_token_ids": true,
		}, &chat))
		require.Len(t, chat.PromptLogprobs, len(chat.PromptTokenIDs))
		require.Equal(t, "null", string(chat.PromptLogprobs[0]))
		got[s.Name] = out
	})
	a, okA := got["vllm"]
	b, okB := got["transformers"]
	if !okA || !okB {
		t.Skip("one backend only: no cross-backend comparison")
	}
	require.Equal(t, a.Choices[0].PromptTokenIDs, b.Choices[0].PromptTokenIDs)
	for i, pos := range a.Choices[0].PromptLogprobs[1:] {
		id := jsonID(a.Choices[0].PromptTokenIDs[i+1])
		x, y := pos[id], b.Choices[0].PromptLogprobs[i+1][id]
		require.InDelta(t, x.Logprob, y.Logprob, 2e-3, "position %d", i+1)
		require.Equal(t, x.DecodedToken, y.DecodedToken)
	}
}

func TestFieldsEchoLogprobs(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		ref := promptLogprobs(t, s).Choices[0]
		var out textAnswer
		require.Equal(t, 200, post(t, s, "/v1/completions", map[string]any{
			"model": model, "prompt": logprobsPrompt, "max_tokens": 3, "temperature": 0, "echo": true,
			"logprobs": 1, "return_token_ids": true,
		}, &out))
		ch := out.Choices[0]
		require.True(t, strings.HasPrefix(ch.Text, logprobsPrompt))
		lp := ch.Logprobs
		require.NotNil(t, lp)
		np := len(ref.PromptTokenIDs)
		require.Len(t, lp.Tokens, np+len(ch.TokenIDs))
		require.Nil(t, lp.TokenLogprobs[0])
		require.Nil(t, lp.TopLogprobs[0])
		require.Equal(t, 0, lp.TextOffset[0])
		for i := 1; i < len(lp.Tokens); i++ {
			require.NotNil(t, lp.TokenLogprobs[i], "token %d", i)
			require.Equal(t, lp.TextOffset[i-1]+len([]rune(lp.Tokens[i-1])), lp.TextOffset[i])
			require.Contains(t, lp.TopLogprobs[i], lp.Tokens[i])
			if i < np {
				require.InDelta(t, ref.PromptLogprobs[i][jsonID(ref.PromptTokenIDs[i])].Logprob, *lp.TokenLogprobs[i], 1e-3)
			}
		}
		require.Equal(t, logprobsPrompt, strings.Join(lp.Tokens[:np], ""))

		// Streamed: the first chunk carries the prompt and its logprobs.
		lines := postStream(t, s, "/v1/completions", map[string]any{
			"model": model, "prompt": logprobsPrompt, "max_tokens": 3, "temperature": 0, "echo": true,
			"logprobs": 1, "stream": true,
		})
		var first textAnswer
		require.NoError(t, json.Unmarshal([]byte(lines[0]), &first))
		require.True(t, strings.HasPrefix(first.Choices[0].Text, logprobsPrompt))
		require.GreaterOrEqual(t, len(first.Choices[0].Logprobs.Tokens), np)
		require.Nil(t, first.Choices[0].Logprobs.TokenLogprobs[0])

		// logprobs 0: the sampled token alone in top_logprobs, as vLLM.
		var zero textAnswer
		require.Equal(t, 200, post(t, s, "/v1/completions", map[string]any{
			"model": model, "prompt": logprobsPrompt, "max_tokens": 3, "logprobs": 0,
		}, &zero))
		zl := zero.Choices[0].Logprobs
		for i, tok := range zl.Tokens {
			require.Len(t, zl.TopLogprobs[i], 1)
			require.InDelta(t, *zl.TokenLogprobs[i], zl.TopLogprobs[i][tok], 1e-9)
		}
		require.False(t, math.IsNaN(*zl.TokenLogprobs[0]))
	})
}

func jsonID(id int32) string {
	b, _ := json.Marshal(id)
	return string(b)
}
