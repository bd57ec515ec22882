package engine

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"

	"github.com/govllm/govllm/llm"
)

// Embeddings (llm.Embedder): Embed sends cmdEmbed (the llm.EmbedRequest as JSON) and waits for
// the one evEmbedding that answers it, by request id. The reply's meta is a little-endian u32
// header length, the JSON header (embedHeader) and the vectors as little-endian float32s, row
// after row; a refused or failed request has a header with only its error. A context that ends
// first sends cmdAbort (the bridge cancels the request's task) and drops the late reply.

// embedHeader is the JSON head of an evEmbedding record.
type embedHeader struct {
	Error        *RequestError `json:"error"`
	Count        int           `json:"count"`
	Dim          int           `json:"dim"`
	PromptTokens int           `json:"prompt_tokens"`
}

// embedReply is what the poller hands the waiting Embed call.
type embedReply struct {
	result llm.EmbedResult
	err    error
}

// Embed pools one vector per input on a model served with the pooling runner. A model loaded
// for generation answers 400 naming --runner pooling (the bridge says so).
func (e *Engine) Embed(ctx context.Context, req llm.EmbedRequest) (llm.EmbedResult, error) {
	if err := e.Health(); err != nil {
		return llm.EmbedResult{}, err
	}
	if len(req.Inputs) == 0 {
		return llm.EmbedResult{}, &RequestError{Status: 400, Type: "BadRequestError", Param: "input",
			Message: "the request has no inputs"}
	}
	if err := ctx.Err(); err != nil {
		return llm.EmbedResult{}, err
	}
	payload, err := json.Marshal(&req)
	if err != nil {
		return llm.EmbedResult{}, fmt.Errorf("engine: encode embed request: %w", err)
	}
	id := nextRequestID.Add(1)
	ch := make(chan embedReply, 1)
	e.embedWait.Store(id, ch)
	defer e.embedWait.Delete(id)
	if rc := e.api.send(cmdEmbed, id, &payload[0], int64(len(payload))); rc != 0 {
		return llm.EmbedResult{}, fmt.Errorf("%w: embed: %s", ErrEngineDead, e.api.lastError())
	}
	select {
	case r := <-ch:
		return r.result, r.err
	case <-ctx.Done():
		e.abort(id)
		return llm.EmbedResult{}, fmt.Errorf("engine: embed: %w", ctx.Err())
	case <-e.stopped:
		if err := e.Health(); err != nil {
			return llm.EmbedResult{}, err
		}
		return llm.EmbedResult{}, ErrClosed
	}
}

// onEmbedding hands an evEmbedding to its waiting Embed call (none when it gave up). It runs
// on the poller: the vectors are copied out of the poll buffer.
func (e *Engine) onEmbedding(ev *event) {
	v, ok := e.embedWait.LoadAndDelete(ev.reqID)
	if !ok {
		return
	}
	r, err := decodeEmbedding(ev.meta)
	if _, refused := errors.AsType[*RequestError](err); err != nil && !refused {
		e.log.Error("engine: bad embedding event", "request", ev.reqID, "err", err)
	}
	v.(chan embedReply) <- embedReply{result: r, err: err}
}

// decodeEmbedding reads an evEmbedding's meta: the backend's error, or the vectors.
func decodeEmbedding(meta []byte) (llm.EmbedResult, error) {
	if len(meta) < 4 {
		return llm.EmbedResult{}, errors.New("engine: embedding event shorter than its header length")
	}
	n := int(binary.LittleEndian.Uint32(meta))
	if 4+n > len(meta) {
		return llm.EmbedResult{}, fmt.Errorf("engine: embedding header of %d bytes in a %d-byte event", n, len(meta))
	}
	var h embedHeader
	if err := json.Unmarshal(meta[4:4+n], &h); err != nil {
		return llm.EmbedResult{}, fmt.Errorf("engine: embedding header: %w", err)
	}
	if h.Error != nil {
		if h.Error.Status == 0 {
			h.Error.Status = 500
		}
		if h.Error.Type == "" {
			h.Error.Type = "InternalServerError"
		}
		return llm.EmbedResult{}, h.Error
	}
	data := meta[4+n:]
	if h.Count < 0 || h.Dim < 0 || len(data) != 4*h.Count*h.Dim {
		return llm.EmbedResult{}, fmt.Errorf("engine: embedding event of %d x %d floats carries %d bytes", h.Count, h.Dim, len(data))
	}
	flat := make([]float32, h.Count*h.Dim)
	for i := range flat {
		flat[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	vectors := make([][]float32, h.Count)
	for i := range vectors {
		vectors[i] = flat[i*h.Dim : (i+1)*h.Dim : (i+1)*h.Dim]
	}
	return llm.EmbedResult{Vectors: vectors, PromptTokens: h.PromptTokens}, nil
}
