package llm

import "context"

// Generator is what a server needs from an inference engine; *engine.Engine implements it,
// tests supply fakes.
type Generator interface {
	// Generate starts one request. ctx covers the whole request: cancelling it aborts the
	// request in the engine and ends the stream with ctx's error.
	Generate(ctx context.Context, req Request) (TokenStream, error)
	// Model describes the served model.
	Model() ModelInfo
	// Health returns nil while the engine can serve requests, else an error wrapping
	// ErrEngineDead or ErrClosed.
	Health() error
}

// TokenStream is the output of one request started by [Generator.Generate].
type TokenStream interface {
	// Recv returns the next delta of any choice, and io.EOF after the last delta of all
	// choices. Any other error ends the stream: a *RequestError, ErrEngineDead,
	// ErrSlowConsumer, ErrClosed or the request context's error.
	Recv() (Delta, error)
	// Usage counts the request's tokens; it is complete once Recv has returned io.EOF.
	Usage() Usage
	// Close releases the stream and aborts the request if it has not finished. It may be
	// called more than once.
	Close()
}

// Aborter is implemented by streams that can stop their request early while still delivering
// what was generated and the usage (engine's streams do). A server uses it to end a request
// with finish_reason "abort" instead of cutting it off.
type Aborter interface {
	Abort()
}
