package server

import (
	"encoding/json"
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
	// StopReason is on a choice's finish chunk only: the matched stop string, the stop token
	// id, or null (as vLLM writes it).
	StopReason json.RawMessage `json:"stop_reason,omitempty"`
	TokenIDs   *[]int32        `json:"token_ids,omitempty"` // with return_token_ids
}

// chunkDelta is {"role":"assistant","content":""} in the role chunk, {"content":"…"} in a
// content chunk and {} in the finish chunk. An increment of reasoning or tool calls carries
// "reasoning" or "tool_calls" (with "content" only when there is content too).
type chunkDelta struct {
	Role      string          `json:"role,omitempty"`
	Content   *string         `json:"content,omitempty"`
	Reasoning *string         `json:"reasoning,omitempty"`
	ToolCalls []chunkToolCall `json:"tool_calls,omitempty"`
}

// chunkToolCall is a streamed piece of a tool call: the first piece of a call is
// {"index","id","type":"function","function":{"name","arguments"}}, later ones
// {"index","function":{"arguments"}}; the arguments fragments concatenate to the arguments'
// JSON text, as OpenAI streams them.
type chunkToolCall struct {
	Index    int           `json:"index"`
	ID       string        `json:"id,omitempty"`
	Type     string        `json:"type,omitempty"`
	Function chunkFunction `json:"function"`
}

// chunkFunction is the function of a chunkToolCall.
type chunkFunction struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

func toChunkToolCalls(pieces []llm.ToolCallDelta) []chunkToolCall {
	if len(pieces) == 0 {
		return nil
	}
	out := make([]chunkToolCall, len(pieces))
	for i, p := range pieces {
		out[i] = chunkToolCall{Index: p.Index, ID: p.ID, Type: p.Type,
			Function: chunkFunction{Name: p.Name, Arguments: p.Arguments}}
	}
	return out
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
	// PromptLogprobs are vLLM's prompt_logprobs, when asked for (or with echo).
	PromptLogprobs *promptLogprobsJSON `json:"prompt_logprobs,omitempty"`
}

type completionChoice struct {
	Index        int              `json:"index"`
	Message      assistantMessage `json:"message"`
	Logprobs     *chatLogprobs    `json:"logprobs"` // null unless asked for
	FinishReason string           `json:"finish_reason"`
	// StopReason is the matched stop string or stop token id, else null.
	StopReason any      `json:"stop_reason"`
	TokenIDs   *[]int32 `json:"token_ids,omitempty"` // with return_token_ids
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

// assistantMessage is the message of a non-streamed choice. As in vLLM, tool_calls is always
// there ([] when none); content is null when the message has tool calls and no content, as
// in OpenAI's answers; reasoning is left out when there is none.
type assistantMessage struct {
	Role      string         `json:"role"`
	Content   *string        `json:"content"`
	Reasoning *string        `json:"reasoning,omitempty"`
	ToolCalls []llm.ToolCall `json:"tool_calls"`
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
	c := s.newCall(r, &req, params, info, start, "chatcmpl-", "chat")
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

// forceDelta turns the text of d, a delta of a streamed forced tool choice, into tool-call
// pieces (forcedcall.go); the finish reason of complete calls is "tool_calls".
func (c *call) forceDelta(d *llm.Delta) {
	x := c.forced[d.Index]
	if x == nil {
		x = newForcedCalls(c.params.forced, func() string { return c.newID(toolCallIDPrefix) })
		c.forced[d.Index] = x
	}
	pieces, content := x.feed(d.Text)
	d.Text, d.ToolCalls = content, pieces
	if d.FinishReason == "" {
		return
	}
	rest, ok := x.finish()
	d.Text += rest
	if ok && (d.FinishReason == "stop" || d.FinishReason == "length") {
		d.FinishReason = "tool_calls"
	}
}

func (chatFormat) writeDelta(sw *sseWriter, c *call, d llm.Delta, first bool) {
	if c.forced != nil {
		c.forceDelta(&d)
	}
	chunk := chatChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model}
	var one [1]chunkChoice
	emit := func(delta chunkDelta, lps *chatLogprobs, finish *string, ids *[]int32) {
		one[0] = chunkChoice{Index: d.Index, Delta: delta, Logprobs: lps, FinishReason: finish, TokenIDs: ids}
		if finish != nil {
			one[0].StopReason = stopReasonJSON(d.StopReason)
		}
		chunk.Choices = one[:]
		sw.writeSSE(&chunk)
	}
	if first {
		empty := ""
		chunk.Usage = c.usageSoFar(d.Index, false) // vLLM's role chunk counts no output yet
		emit(chunkDelta{Role: c.params.respRole(), Content: &empty}, nil, nil, nil)
		if e := c.params.chatEcho; e != nil && *e != "" {
			emit(chunkDelta{Content: e}, nil, nil, nil) // vLLM's echo: the last message, once per choice
		}
	}
	chunk.Usage = c.usageSoFar(d.Index, true)
	var ids *[]int32
	if c.params.tokenIDs {
		ids = nonNilIDs(d.TokenIDs)
	}
	plain := d.Reasoning == "" && len(d.ToolCalls) == 0
	if d.Text != "" && plain && !c.params.logprobs && ids == nil && chunk.Usage == nil {
		sw.appendContentChunk(c, d.Index, d.Text) // the per-token event, without reflection
	} else if d.Text != "" || !plain || (c.params.logprobs && len(d.Logprobs) > 0) || (ids != nil && len(*ids) > 0) {
		var lps *chatLogprobs
		if c.params.logprobs {
			lps = toChatLogprobs(d.Logprobs)
		}
		delta := chunkDelta{ToolCalls: toChunkToolCalls(d.ToolCalls)}
		if d.Text != "" || plain {
			delta.Content = &d.Text
		}
		if d.Reasoning != "" {
			delta.Reasoning = &d.Reasoning
		}
		emit(delta, lps, nil, ids)
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

func (chatFormat) response(c *call, outs []choiceOut, u usage) any {
	resp := chatCompletion{
		ID:                c.id,
		Object:            "chat.completion",
		Created:           c.created,
		Model:             c.model,
		Choices:           make([]completionChoice, len(outs)),
		Usage:             u,
		SystemFingerprint: c.fingerprint,
		PromptTokenIDs:    c.promptIDs(),
		PromptLogprobs:    c.promptLogprobsOut(),
	}
	for i := range resp.Choices {
		o := &outs[i]
		if f := c.params.forced; f != nil {
			// Forced tool choice: complete calls replace the text, else it stays content.
			if calls, ok := parseForced(f, o.text, func() string { return c.newID(toolCallIDPrefix) }); ok {
				o.toolCalls, o.text = calls, ""
				if o.reason == "stop" || o.reason == "length" {
					o.reason = "tool_calls"
				}
			}
		}
		msg := assistantMessage{Role: c.params.respRole(), Content: &o.text, ToolCalls: o.toolCalls}
		if msg.ToolCalls == nil {
			msg.ToolCalls = []llm.ToolCall{}
		} else if o.text == "" {
			msg.Content = nil
		}
		if e := c.params.chatEcho; e != nil {
			full := *e + o.text // vLLM: echo + (content or "")
			msg.Content = &full
		}
		if o.reasoning != "" {
			msg.Reasoning = &o.reasoning
		}
		resp.Choices[i] = completionChoice{Index: i, Message: msg, FinishReason: o.reason, StopReason: o.stopReason}
		if c.params.logprobs {
			resp.Choices[i].Logprobs = toChatLogprobs(o.logprobs)
		}
		if c.params.tokenIDs {
			resp.Choices[i].TokenIDs = nonNilIDs(c.tokenIDs[i])
		}
	}
	return &resp
}

// stopReasonJSON is a finish chunk's stop_reason: the reason's JSON, or null.
func stopReasonJSON(reason any) json.RawMessage {
	if reason != nil {
		if b, err := json.Marshal(reason); err == nil {
			return b
		}
	}
	return json.RawMessage("null")
}
