package engine

import (
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/govllm/govllm/tokenize"
)

// Go tokenizes prompts for the bridge when it can: the backend's READY names its tokenizer.json,
// and if package tokenize reproduces that tokenizer exactly, _govllm_shim.encode calls back into
// Go (on the bridge's thread, with the GIL held) instead of Hugging Face's encode, which costs
// the interpreter's thread about as much per request as everything else it does. The backends
// check the encoder against their own tokenizer on probe texts before they use it.

// currentEncoder is the encoder of the engine running now (one per process at a time).
var currentEncoder atomic.Pointer[tokenize.Encoder]

var (
	encodeCallbackOnce sync.Once
	encodeCallback     uintptr
)

// encodeIDs is the shim's encoder: see shim_encode_fn in cshim/shim.h.
func encodeIDs(text *byte, n int64, addSpecial int64, out *int32, capacity int64) int64 {
	enc := currentEncoder.Load()
	if enc == nil {
		return -1
	}
	ids := enc.Encode(unsafe.String(text, int(n)), addSpecial != 0)
	if int64(len(ids)) <= capacity && len(ids) > 0 {
		copy(unsafe.Slice(out, len(ids)), ids)
	}
	return int64(len(ids))
}

// installEncoder makes enc (nil: none) the prompt encoder behind _govllm_shim.encode.
func (e *Engine) installEncoder(enc *tokenize.Encoder) {
	currentEncoder.Store(enc)
	if enc == nil {
		e.api.setEncoder(0)
		return
	}
	encodeCallbackOnce.Do(func() { encodeCallback = purego.NewCallback(encodeIDs) })
	e.api.setEncoder(encodeCallback)
}
