package llm

import (
	"errors"
	"fmt"
)

// RequestError is a failure of one request: the engine keeps serving others. Status is the HTTP
// status a server should answer with: 4xx only for the client's input (the backend's own
// request validation), 500 for an engine error in that request, 503 when the engine died.
type RequestError struct {
	Status  int    `json:"status"`
	Type    string `json:"type"`
	Param   string `json:"param,omitempty"`
	Message string `json:"message"`
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("engine: request failed (%d %s): %s", e.Status, e.Type, e.Message)
}

// Sentinel errors every engine reports.
var (
	// ErrClosed is returned by Generate after the engine was closed, and by Recv after Close.
	ErrClosed = errors.New("engine: closed")
	// ErrEngineDead means the engine can serve no more requests; a supervisor should restart it.
	ErrEngineDead = errors.New("engine: engine is dead")
	// ErrSlowConsumer ends a stream whose reader fell too far behind; the request is aborted.
	ErrSlowConsumer = errors.New("engine: stream reader too slow, request aborted")
)
