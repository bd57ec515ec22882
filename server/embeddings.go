package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/http"

	"github.com/govllm/govllm/llm"
)

// maxEmbeddingInputs bounds the inputs of one embeddings request (OpenAI's limit).
const maxEmbeddingInputs = 2048

// embeddingExtensions are vLLM's extensions of the embeddings request that govllm does not
// implement: a request that sets one (to anything but null) gets a 400 naming it rather than an
// answer that ignored it.
type embeddingExtensions struct {
	Messages             json.RawMessage `json:"messages"`
	TruncatePromptTokens json.RawMessage `json:"truncate_prompt_tokens"`
	UseActivation        json.RawMessage `json:"use_activation"`
	Normalize            json.RawMessage `json:"normalize"`
	EmbedDtype           json.RawMessage `json:"embed_dtype"`
	Endianness           json.RawMessage `json:"endianness"`
	Priority             json.RawMessage `json:"priority"`
	RequestID            json.RawMessage `json:"request_id"`
	MMProcessorKwargs    json.RawMessage `json:"mm_processor_kwargs"`
	CacheSalt            json.RawMessage `json:"cache_salt"`
	Padding              json.RawMessage `json:"padding"`
	TruncationSide       json.RawMessage `json:"truncation_side"`
	ChatTemplate         json.RawMessage `json:"chat_template"`
	ChatTemplateKwargs   json.RawMessage `json:"chat_template_kwargs"`
	AddGenerationPrompt  json.RawMessage `json:"add_generation_prompt"`
	ContinueFinalMessage json.RawMessage `json:"continue_final_message"`
}

// firstSet names the first extension the request sets, or "".
func (x *embeddingExtensions) firstSet() string {
	for _, f := range []struct {
		name string
		v    json.RawMessage
	}{
		{"messages", x.Messages}, {"truncate_prompt_tokens", x.TruncatePromptTokens},
		{"use_activation", x.UseActivation}, {"normalize", x.Normalize}, {"embed_dtype", x.EmbedDtype},
		{"endianness", x.Endianness}, {"priority", x.Priority}, {"request_id", x.RequestID},
		{"mm_processor_kwargs", x.MMProcessorKwargs}, {"cache_salt", x.CacheSalt}, {"padding", x.Padding},
		{"truncation_side", x.TruncationSide}, {"chat_template", x.ChatTemplate},
		{"chat_template_kwargs", x.ChatTemplateKwargs}, {"add_generation_prompt", x.AddGenerationPrompt},
		{"continue_final_message", x.ContinueFinalMessage},
	} {
		if v := bytes.TrimSpace(f.v); len(v) > 0 && !bytes.Equal(v, []byte("null")) {
			return f.name
		}
	}
	return ""
}

// embeddingRequest is the body of POST /v1/embeddings.
type embeddingRequest struct {
	Model          string          `json:"model"`
	Input          json.RawMessage `json:"input"`
	EncodingFormat *string         `json:"encoding_format"`
	Dimensions     *int            `json:"dimensions"`
	User           *string         `json:"user"` // accepted and ignored, as OpenAI's servers log it
	// AddSpecialTokens is vLLM's extension; only its default (true) is served.
	AddSpecialTokens *bool `json:"add_special_tokens"`
	embeddingExtensions
}

// embeddingResponse is the answer: OpenAI's list of embeddings, with vLLM's id and created.
type embeddingResponse struct {
	ID      string          `json:"id"`
	Object  string          `json:"object"`
	Created int64           `json:"created"`
	Model   string          `json:"model"`
	Data    []embeddingData `json:"data"`
	Usage   embeddingUsage  `json:"usage"`
}

// embeddingData is one input's vector: a JSON array of floats, or (encoding_format "base64")
// the base64 of its little-endian float32s.
type embeddingData struct {
	Index     int    `json:"index"`
	Object    string `json:"object"`
	Embedding any    `json:"embedding"`
}

type embeddingUsage struct {
	PromptTokens int `json:"prompt_tokens"`
	TotalTokens  int `json:"total_tokens"`
}

// toEngine validates e against the served model and converts it into an embed request; base64
// says how to encode the vectors.
func (b *embeddingRequest) toEngine(m llm.ModelInfo) (req llm.EmbedRequest, base64 bool, e *apiError) {
	if e = checkModel(b.Model, m); e != nil {
		return
	}
	if f := b.firstSet(); f != "" {
		e = badRequest(f, "`%s` is not supported by this server's embeddings.", f)
		return
	}
	if b.AddSpecialTokens != nil && !*b.AddSpecialTokens {
		e = badRequest("add_special_tokens", "add_special_tokens false is not supported: inputs are tokenized with the tokenizer's special tokens.")
		return
	}
	if m.Runner != llm.RunnerPooling {
		e = badRequest("model", "The model `%s` is served with the generate runner, which makes no embeddings: start the server with --runner pooling (and an embedding model) to serve /v1/embeddings.", m.ID)
		return
	}
	if b.EncodingFormat != nil {
		switch *b.EncodingFormat {
		case "float":
		case "base64":
			base64 = true
		default:
			e = badRequest("encoding_format", "encoding_format must be \"float\" or \"base64\", got %q.", *b.EncodingFormat)
			return
		}
	}
	if b.Dimensions != nil {
		if *b.Dimensions < 1 {
			e = badRequest("dimensions", "dimensions must be a positive integer, got %d.", *b.Dimensions)
			return
		}
		d := *b.Dimensions
		req.Dimensions = &d
	}
	req.Inputs, e = parseEmbeddingInput(b.Input)
	return
}

// parseEmbeddingInput decodes "input": a string, an array of strings, an array of token ids or
// an array of token-id arrays, each non-empty.
func parseEmbeddingInput(raw json.RawMessage) ([]llm.EmbedInput, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, badRequest("input", "input is required.")
	}
	const shape = "input must be a string, an array of strings, an array of token ids, or an array of token-id arrays."
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, badRequest("input", "input is not a valid string: %v.", err)
		}
		if s == "" {
			return nil, badRequest("input", "input must not be an empty string.")
		}
		return []llm.EmbedInput{{Text: s}}, nil
	case '[':
	default:
		return nil, badRequest("input", shape)
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, badRequest("input", shape)
	}
	if len(items) == 0 {
		return nil, badRequest("input", "input must not be an empty array.")
	}
	first := bytes.TrimSpace(items[0])
	if len(first) == 0 {
		return nil, badRequest("input", shape)
	}
	switch first[0] {
	case '"', '[':
		if len(items) > maxEmbeddingInputs {
			return nil, badRequest("input", "input has %d items: at most %d per request.", len(items), maxEmbeddingInputs)
		}
		out := make([]llm.EmbedInput, len(items))
		for i, it := range items {
			it = bytes.TrimSpace(it)
			switch {
			case first[0] == '"' && len(it) > 0 && it[0] == '"':
				var s string
				if err := json.Unmarshal(it, &s); err != nil {
					return nil, badRequest("input", "input[%d] is not a valid string: %v.", i, err)
				}
				if s == "" {
					return nil, badRequest("input", "input[%d] must not be an empty string.", i)
				}
				out[i].Text = s
			case first[0] == '[' && len(it) > 0 && it[0] == '[':
				var ids []json.RawMessage
				if err := json.Unmarshal(it, &ids); err != nil {
					return nil, badRequest("input", "input[%d] must be an array of token ids.", i)
				}
				if len(ids) == 0 {
					return nil, badRequest("input", "input[%d] must not be an empty array.", i)
				}
				toks, e := tokenIDs(ids, fmt.Sprintf("input[%d]", i))
				if e != nil {
					return nil, e
				}
				out[i].TokenIDs = toks
			default:
				return nil, badRequest("input", "input[%d] is not of the same kind as input[0]: %s", i, shape)
			}
		}
		return out, nil
	}
	toks, e := tokenIDs(items, "input")
	if e != nil {
		return nil, e
	}
	return []llm.EmbedInput{{TokenIDs: toks}}, nil
}

// tokenIDs reads JSON numbers that must be token ids; where names them in errors.
func tokenIDs(items []json.RawMessage, where string) ([]int32, *apiError) {
	ids := make([]int32, len(items))
	for i, it := range items {
		var f float64
		if err := json.Unmarshal(it, &f); err != nil || f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
			return nil, badRequest("input", "%s[%d] must be a token id (a non-negative integer), got %s.", where, i, bytes.TrimSpace(it))
		}
		ids[i] = int32(f)
	}
	return ids, nil
}

// handleEmbeddings serves POST /v1/embeddings.
func (s *Server) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	id := s.newID("embd-")
	log := s.log.With("request_id", id)
	var body embeddingRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, log, e, e)
		return
	}
	embedder, ok := s.backend.(llm.Embedder)
	if !ok {
		e := errorf(http.StatusNotImplemented, "", "This server's backend does not make embeddings.")
		s.reject(w, log, e, e)
		return
	}
	info := s.backend.Model()
	req, asBase64, e := body.toEngine(info)
	if e != nil {
		s.reject(w, log, e, e)
		return
	}
	req.ID = id
	ctx := r.Context()
	release, e := s.admit(ctx, start)
	if release == nil {
		if e != nil {
			w.Header().Set("Retry-After", retryAfter)
		}
		s.reject(w, log, fmt.Errorf("server: admission: %w", errNotAdmitted), e)
		return
	}
	defer release()
	if s.requestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.requestTimeout-s.now().Sub(start))
		defer cancel()
	}
	res, err := embedder.Embed(ctx, req)
	if err != nil {
		e := toAPIError(err)
		if e == nil && ctx.Err() != nil && r.Context().Err() == nil {
			e = errorf(http.StatusServiceUnavailable, "", "The request did not finish within %v.", s.requestTimeout)
		}
		s.reject(w, log, fmt.Errorf("server: embed: %w", err), e)
		return
	}
	if len(res.Vectors) != len(req.Inputs) {
		e := errorf(http.StatusInternalServerError, "", "Internal server error")
		s.reject(w, log, fmt.Errorf("server: embed: %d vectors for %d inputs", len(res.Vectors), len(req.Inputs)), e)
		return
	}
	resp := embeddingResponse{ID: id, Object: "list", Created: start.Unix(), Model: info.ID,
		Data:  make([]embeddingData, len(res.Vectors)),
		Usage: embeddingUsage{PromptTokens: res.PromptTokens, TotalTokens: res.PromptTokens}}
	for i, v := range res.Vectors {
		resp.Data[i] = embeddingData{Index: i, Object: "embedding", Embedding: v}
		if asBase64 {
			resp.Data[i].Embedding = base64Floats(v)
		}
	}
	s.metrics.promptTokens.Add(float64(res.PromptTokens))
	log.Debug("embeddings done", "inputs", len(req.Inputs), "prompt_tokens", res.PromptTokens, "duration", s.now().Sub(start))
	writeJSON(w, http.StatusOK, resp)
}

// base64Floats is OpenAI's base64 encoding of a vector: its little-endian float32s.
func base64Floats(v []float32) string {
	buf := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(f))
	}
	return base64.StdEncoding.EncodeToString(buf)
}
