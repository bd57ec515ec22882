package engine

import (
	"errors"

	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/llm"
)

// The request and response types are package llm's (the contract, free of cgo and purego);
// these aliases let library users write engine.Request as before.
type (
	// Message is llm.Message.
	Message = llm.Message
	// SamplingParams is llm.SamplingParams.
	SamplingParams = llm.SamplingParams
	// Request is llm.Request.
	Request = llm.Request
	// Delta is llm.Delta.
	Delta = llm.Delta
	// TokenLogprob is llm.TokenLogprob.
	TokenLogprob = llm.TokenLogprob
	// Usage is llm.Usage.
	Usage = llm.Usage
	// RequestError is llm.RequestError.
	RequestError = llm.RequestError
	// ModelInfo is llm.ModelInfo.
	ModelInfo = llm.ModelInfo
	// Stats is llm.Stats.
	Stats = llm.Stats
	// ToolCall is llm.ToolCall.
	ToolCall = llm.ToolCall
	// ToolCallDelta is llm.ToolCallDelta.
	ToolCallDelta = llm.ToolCallDelta
	// StructuredOutputs is llm.StructuredOutputs.
	StructuredOutputs = llm.StructuredOutputs
	// Parsing is llm.Parsing.
	Parsing = llm.Parsing
)

// Sentinel errors of the engine package. The first three are llm's, so errors.Is works with
// either name.
var (
	// ErrClosed is llm.ErrClosed: returned by Generate after Close.
	ErrClosed = llm.ErrClosed
	// ErrEngineDead is llm.ErrEngineDead: the engine can serve no more requests.
	ErrEngineDead = llm.ErrEngineDead
	// ErrSlowConsumer is llm.ErrSlowConsumer: a stream's reader fell too far behind.
	ErrSlowConsumer = llm.ErrSlowConsumer
	// ErrPythonNotFound means no usable Python interpreter was found.
	ErrPythonNotFound = pyfind.ErrPythonNotFound
	// ErrShim means the C shim or libpython could not be loaded.
	ErrShim = errors.New("engine: cannot load the shim")
	// ErrAlreadyStarted means an interpreter was already embedded in this process; CPython
	// cannot be initialized twice, so a process hosts at most one Engine.
	ErrAlreadyStarted = errors.New("engine: an engine was already started in this process")
)

// Engine implements the contract the server needs.
var _ llm.Generator = (*Engine)(nil)
