package server

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"

	"github.com/govllm/govllm/llm"
)

// defaultCompletionMaxTokens is max_tokens of a text completion that sets none, as in OpenAI's
// API and vLLM.
const defaultCompletionMaxTokens = 16

// completionRequest is the body of POST /v1/completions. Fields the server does not know are
// ignored, as vLLM and OpenAI do.
type completionRequest struct {
	Model     string          `json:"model"`
	Prompt    json.RawMessage `json:"prompt"`
	MaxTokens *int            `json:"max_tokens"`
	Echo      bool            `json:"echo"`
	Logprobs  *int            `json:"logprobs"`
	Suffix    *string         `json:"suffix"`
	BestOf    *int            `json:"best_of"`
	samplingRequest
}

// toEngine validates c against the served model and converts it into an engine request; echo
// is the text to put before each choice's output.
func (c *completionRequest) toEngine(m llm.ModelInfo) (req llm.Request, p callParams, echo string, e *apiError) {
	p = callParams{n: 1, stream: c.Stream}
	if e = checkModel(c.Model, m); e != nil {
		return
	}
	req.Adapter = adapterFor(c.Model, m)
	if req.Prompt, req.PromptTokenIDs, e = parsePrompt(c.Prompt, true); e != nil {
		return
	}
	if c.Echo {
		if req.PromptTokenIDs != nil {
			e = badRequest("echo", "echo is not supported with a prompt of token ids; send the prompt as text.")
			return
		}
		echo = req.Prompt
	}
	sp := &req.Sampling
	sp.MaxTokens = defaultCompletionMaxTokens
	if c.MaxTokens != nil {
		sp.MaxTokens = *c.MaxTokens
		if e = checkMaxTokens("max_tokens", sp.MaxTokens, m.MaxModelLen); e != nil {
			return
		}
	}
	if e = c.samplingRequest.apply(sp, &p, m); e != nil {
		return
	}
	switch {
	case c.Logprobs != nil && (*c.Logprobs < 0 || *c.Logprobs > maxLogprobs):
		e = badRequest("logprobs", "logprobs must be in [0, %d], got %d.", maxLogprobs, *c.Logprobs)
	case c.Logprobs != nil && c.Echo:
		e = badRequest("logprobs", "logprobs with echo (prompt logprobs) are not supported.")
	case c.Suffix != nil && *c.Suffix != "":
		e = badRequest("suffix", "suffix is not supported.")
	case c.BestOf != nil && *c.BestOf != p.n && *c.BestOf != 1:
		e = badRequest("best_of", "best_of is not supported.")
	}
	if e == nil && c.Logprobs != nil {
		n := *c.Logprobs
		sp.Logprobs = &n
		p.logprobs = true
	}
	return
}

// parsePrompt decodes "prompt": a string, an array of token ids, or an array holding one of
// those (when outer). Several prompts in one request are refused.
func parsePrompt(raw json.RawMessage, outer bool) (string, []int32, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil, badRequest("prompt", "prompt is required.")
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", nil, badRequest("prompt", "prompt is not a valid string: %v.", err)
		}
		if s == "" {
			return "", nil, badRequest("prompt", "prompt must not be empty.")
		}
		return s, nil, nil
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return "", nil, badRequest("prompt", "prompt must be a string, an array of token ids, or an array of one of those.")
		}
		if len(items) == 0 {
			return "", nil, badRequest("prompt", "prompt must not be empty.")
		}
		if first := bytes.TrimSpace(items[0]); outer && len(first) > 0 && (first[0] == '"' || first[0] == '[') {
			if len(items) > 1 {
				return "", nil, badRequest("prompt",
					"Several prompts in one request are not supported (got %d): send one request per prompt.", len(items))
			}
			return parsePrompt(items[0], false)
		}
		ids := make([]int32, len(items))
		for i, it := range items {
			var f float64
			if err := json.Unmarshal(it, &f); err != nil || f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
				return "", nil, badRequest("prompt", "prompt[%d] must be a token id (a non-negative integer), got %s.", i, it)
			}
			ids[i] = int32(f)
		}
		return "", ids, nil
	}
	return "", nil, badRequest("prompt", "prompt must be a string, an array of token ids, or an array of one of those.")
}

// handleCompletions serves POST /v1/completions.
func (s *Server) handleCompletions(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	var body completionRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	info := s.backend.Model()
	req, params, echo, e := body.toEngine(info)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	req.ID = s.newID("cmpl-")
	c := &call{
		id:          req.ID,
		created:     start.Unix(),
		model:       responseModel(req, info),
		fingerprint: fingerprint(info),
		params:      params,
		echo:        echo,
		log:         s.log.With("request_id", req.ID),
		start:       start,
		kind:        "text",
	}
	s.generate(w, r, req, c, textFormat{})
}

// textCompletion is a non-streamed text completion, and each of its streamed chunks
// ("text_completion" both).
type textCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []textChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
	SystemFingerprint string       `json:"system_fingerprint,omitempty"`
}

// textChoice is one choice of a text completion: its whole text, or a streamed increment.
type textChoice struct {
	Index        int           `json:"index"`
	Text         string        `json:"text"`
	Logprobs     *textLogprobs `json:"logprobs"` // null unless asked for
	FinishReason *string       `json:"finish_reason"`
	StopReason   *struct{}     `json:"stop_reason"`         // always null
	TokenIDs     *[]int32      `json:"token_ids,omitempty"` // with return_token_ids
	// PromptTokenIDs (return_token_ids): with a choice's first chunk, or on every choice.
	PromptTokenIDs *[]int32 `json:"prompt_token_ids,omitempty"`
}

// textLogprobs are the legacy completions logprobs of a choice (or of a streamed increment).
type textLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// toTextLogprobs converts lps; offset is where the first token starts in the choice's text.
func toTextLogprobs(lps []llm.TokenLogprob, offset int) *textLogprobs {
	t := &textLogprobs{
		Tokens:        make([]string, len(lps)),
		TokenLogprobs: make([]float64, len(lps)),
		TopLogprobs:   make([]map[string]float64, len(lps)),
		TextOffset:    make([]int, len(lps)),
	}
	for i, lp := range lps {
		t.Tokens[i] = lp.Token
		t.TokenLogprobs[i] = lp.Logprob
		top := make(map[string]float64, len(lp.Top))
		for _, e := range lp.Top {
			if _, dup := top[e.Token]; !dup { // the most likely of tokens that decode alike
				top[e.Token] = e.Logprob
			}
		}
		t.TopLogprobs[i] = top
		t.TextOffset[i] = offset
		offset += len(lp.Token)
	}
	return t
}

// textFormat writes text completions in vLLM's shape: one chunk per delta with the text and,
// on the last of a choice, its finish reason; the echoed prompt goes with a choice's first
// chunk.
type textFormat struct{}

func (textFormat) writeDelta(sw *sseWriter, c *call, d llm.Delta, first bool) {
	text := d.Text
	if first {
		text = c.echo + text
	}
	chunk := textCompletion{ID: c.id, Object: "text_completion", Created: c.created, Model: c.model}
	var one [1]textChoice
	one[0] = textChoice{Index: d.Index, Text: text}
	if c.params.tokenIDs {
		one[0].TokenIDs = nonNilIDs(d.TokenIDs)
		if first {
			one[0].PromptTokenIDs = c.promptIDs()
		}
	}
	if c.params.logprobs {
		one[0].Logprobs = toTextLogprobs(d.Logprobs, c.textOffset[d.Index])
		c.textOffset[d.Index] = advanceOffset(c.textOffset[d.Index], d.Logprobs)
	}
	if d.FinishReason != "" {
		one[0].FinishReason = &d.FinishReason
		if !c.params.includeUsage {
			chunk.SystemFingerprint = c.fingerprint
		}
	}
	chunk.Choices = one[:]
	sw.writeSSE(&chunk)
}

func (textFormat) usageChunk(c *call, u usage) any {
	return &textCompletion{
		ID: c.id, Object: "text_completion", Created: c.created, Model: c.model,
		Choices: []textChoice{}, Usage: &u, SystemFingerprint: c.fingerprint,
	}
}

// advanceOffset is offset past the tokens of lps.
func advanceOffset(offset int, lps []llm.TokenLogprob) int {
	for _, lp := range lps {
		offset += len(lp.Token)
	}
	return offset
}

func (textFormat) response(c *call, outs []choiceOut, u usage) any {
	resp := textCompletion{
		ID:                c.id,
		Object:            "text_completion",
		Created:           c.created,
		Model:             c.model,
		Choices:           make([]textChoice, len(outs)),
		Usage:             &u,
		SystemFingerprint: c.fingerprint,
	}
	for i := range resp.Choices {
		resp.Choices[i] = textChoice{Index: i, Text: outs[i].text, FinishReason: &outs[i].reason}
		if c.params.logprobs {
			resp.Choices[i].Logprobs = toTextLogprobs(outs[i].logprobs, 0)
		}
		if c.params.tokenIDs {
			resp.Choices[i].TokenIDs = nonNilIDs(c.tokenIDs[i])
			resp.Choices[i].PromptTokenIDs = c.promptIDs()
		}
	}
	return &resp
}
