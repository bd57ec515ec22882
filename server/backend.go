package server

import (
	"context"

	"github.com/govllm/govllm/engine"
)

// Backend is what the server needs from an inference engine. [FromEngine] adapts an
// *engine.Engine to it; tests supply fakes.
type Backend interface {
	// Generate starts one request. The stream ends when ctx is cancelled, and the
	// request is then aborted in the engine.
	Generate(ctx context.Context, req engine.Request) (TokenStream, error)
	// Model describes the served model.
	Model() engine.ModelInfo
	// Health returns nil while the engine can serve requests.
	Health() error
}

// TokenStream is the output of one request started by [Backend.Generate].
type TokenStream interface {
	// Recv returns the next delta of any choice, and io.EOF after the last delta of all
	// choices. Any other error ends the stream.
	Recv() (engine.Delta, error)
	// Usage counts the request's tokens; it is valid once Recv has returned io.EOF.
	Usage() engine.Usage
	// Close releases the stream and aborts the request if it has not finished. It may be
	// called more than once.
	Close()
}

// Generator is the method set of *engine.Engine, generic in its stream type so that
// [FromEngine] accepts the engine without a covariant return type.
type Generator[S TokenStream] interface {
	Generate(ctx context.Context, req engine.Request) (S, error)
	Model() engine.ModelInfo
	Health() error
}

// FromEngine adapts g, typically an *engine.Engine, to a [Backend]:
//
//	srv := server.New(server.Config{Backend: server.FromEngine(eng)})
func FromEngine[S TokenStream](g Generator[S]) Backend {
	return engineBackend[S]{g: g}
}

// engineBackend wraps a Generator whose Generate returns a concrete stream type.
type engineBackend[S TokenStream] struct {
	g Generator[S]
}

func (b engineBackend[S]) Generate(ctx context.Context, req engine.Request) (TokenStream, error) {
	s, err := b.g.Generate(ctx, req)
	if err != nil {
		// Do not wrap a typed nil pointer into a non-nil interface.
		return nil, err
	}
	return s, nil
}

func (b engineBackend[S]) Model() engine.ModelInfo { return b.g.Model() }

func (b engineBackend[S]) Health() error { return b.g.Health() }
