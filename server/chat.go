package server

import (
	"net/http"

	"github.com/govllm/govllm/llm"
)

// chatChunk is one streamed event of a chat completion ("chat.completion.chunk").
type chatChunk struct {
	ID      string        `json:"id"`
	Object  string        `json:"object"`
	Created int64         `json:"created"`
	Model   string        `json:"model"`
	Choices []chunkChoice `json:"choices"`
	Usage   *usage        `json:"usage,omitempty"`
	// SystemFingerprint is set on the finish chunks, or on the usage chunk when there is one.
	SystemFingerprint string `json:"system_fingerprint,omitempty"`
}

type chunkChoice struct {
	Index        int           `json:"index"`
	Delta        chunkDelta    `json:"delta"`
	Logprobs     *chatLogprobs `json:"logprobs"` // null unless asked for
	FinishReason *string       `json:"finish_reason"`
	TokenIDs     *[]int32      `json:"token_ids,omitempty"` // with return_token_ids
}

// chunkDelta is {"role":"assistant","content":""} in the role chunk, {"content":"…"} in a
// content chunk and {} in the finish chunk.
type chunkDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func toUsage(u llm.Usage) usage {
	return usage{PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, TotalTokens: u.TotalTokens()}
}

// chatCompletion is the body of a non-streamed chat completion ("chat.completion").
type chatCompletion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	Choices           []completionChoice `json:"choices"`
	Usage             usage              `json:"usage"`
	SystemFingerprint string             `json:"system_fingerprint"`
	PromptTokenIDs    *[]int32           `json:"prompt_token_ids,omitempty"` // with return_token_ids
}

type completionChoice struct {
	Index        int              `json:"index"`
	Message      assistantMessage `json:"message"`
	Logprobs     *chatLogprobs    `json:"logprobs"` // null unless asked for
	FinishReason string           `json:"finish_reason"`
	TokenIDs     *[]int32         `json:"token_ids,omitempty"` // with return_token_ids
}

// chatLogprobs are the logprobs of a choice's content (or of a streamed increment).
type chatLogprobs struct {
	Content []chatLogprob `json:"content"`
}

type chatLogprob struct {
	Token       string       `json:"token"`
	Logprob     float64      `json:"logprob"`
	Bytes       []int        `json:"bytes"`
	TopLogprobs []topLogprob `json:"top_logprobs"`
}

// topLogprob is an entry of top_logprobs, which has no top_logprobs of its own.
type topLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

func toChatLogprobs(lps []llm.TokenLogprob) *chatLogprobs {
	out := &chatLogprobs{Content: make([]chatLogprob, len(lps))}
	for i, lp := range lps {
		top := make([]topLogprob, len(lp.Top))
		for j, t := range lp.Top {
			top[j] = topLogprob{Token: t.Token, Logprob: t.Logprob, Bytes: nonNilBytes(t.Bytes)}
		}
		out.Content[i] = chatLogprob{Token: lp.Token, Logprob: lp.Logprob, Bytes: nonNilBytes(lp.Bytes), TopLogprobs: top}
	}
	return out
}

// nonNilIDs is ids for a token_ids field: [] rather than null when there are none.
func nonNilIDs(ids []int32) *[]int32 {
	if ids == nil {
		ids = []int32{}
	}
	return &ids
}

func nonNilBytes(b []int) []int {
	if b == nil {
		return []int{}
	}
	return b
}

type assistantMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

const assistantRole = "assistant"

// handleChat serves POST /v1/chat/completions.
func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	var body chatRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	info := s.backend.Model()
	req, params, e := body.toEngine(info)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	req.ID = s.newID("chatcmpl-")
	c := &call{
		id:          req.ID,
		created:     start.Unix(),
		model:       info.ID,
		fingerprint: fingerprint(info),
		params:      params,
		log:         s.log.With("request_id", req.ID),
		start:       start,
		kind:        "chat",
	}
	s.generate(w, r, req, c, chatFormat{})
}

// fingerprint is the system_fingerprint of responses: the engine that produced them.
func fingerprint(info llm.ModelInfo) string {
	if info.Backend == "" {
		return "govllm"
	}
	return "govllm-" + info.Backend
}

// chatFormat writes chat completions: per choice a role chunk with its first output, content
// chunks and a separate finish chunk. As in vLLM, system_fingerprint goes on the usage chunk
// when there is one, else on the finish chunks.
type chatFormat struct{}

func (chatFormat) writeDelta(sw *sseWriter, c *call, d llm.Delta, first bool) {
	chunk := chatChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model}
	var one [1]chunkChoice
	emit := func(delta chunkDelta, lps *chatLogprobs, finish *string, ids *[]int32) {
		one[0] = chunkChoice{Index: d.Index, Delta: delta, Logprobs: lps, FinishReason: finish, TokenIDs: ids}
		chunk.Choices = one[:]
		sw.writeSSE(&chunk)
	}
	if first {
		empty := ""
		emit(chunkDelta{Role: assistantRole, Content: &empty}, nil, nil, nil)
	}
	var ids *[]int32
	if c.params.tokenIDs {
		ids = nonNilIDs(d.TokenIDs)
	}
	if d.Text != "" && !c.params.logprobs && ids == nil {
		sw.appendContentChunk(c, d.Index, d.Text) // the per-token event, without reflection
	} else if d.Text != "" || (c.params.logprobs && len(d.Logprobs) > 0) || (ids != nil && len(*ids) > 0) {
		var lps *chatLogprobs
		if c.params.logprobs {
			lps = toChatLogprobs(d.Logprobs)
		}
		emit(chunkDelta{Content: &d.Text}, lps, nil, ids)
		ids = nil
	}
	if d.FinishReason != "" {
		if !c.params.includeUsage {
			chunk.SystemFingerprint = c.fingerprint
		}
		emit(chunkDelta{}, nil, &d.FinishReason, ids)
	}
}

func (chatFormat) usageChunk(c *call, u usage) any {
	return &chatChunk{
		ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
		Choices: []chunkChoice{}, Usage: &u, SystemFingerprint: c.fingerprint,
	}
}

func (chatFormat) response(c *call, texts []string, reasons []string, lps [][]llm.TokenLogprob, u usage) any {
	resp := chatCompletion{
		ID:                c.id,
		Object:            "chat.completion",
		Created:           c.created,
		Model:             c.model,
		Choices:           make([]completionChoice, len(texts)),
		Usage:             u,
		SystemFingerprint: c.fingerprint,
		PromptTokenIDs:    c.promptIDs(),
	}
	for i := range resp.Choices {
		resp.Choices[i] = completionChoice{
			Index:        i,
			Message:      assistantMessage{Role: assistantRole, Content: texts[i]},
			FinishReason: reasons[i],
		}
		if c.params.logprobs {
			resp.Choices[i].Logprobs = toChatLogprobs(lps[i])
		}
		if c.params.tokenIDs {
			resp.Choices[i].TokenIDs = nonNilIDs(c.tokenIDs[i])
		}
	}
	return &resp
}
