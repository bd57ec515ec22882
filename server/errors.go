package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/govllm/govllm/llm"
)

// Sentinel errors of the server package.
var (
	// ErrNoBackend is the panic value of [New] when [Config.Backend] is nil.
	ErrNoBackend = errors.New("server: Config.Backend is nil")

	// errIncompleteStream means the backend ended a stream before every choice had finished.
	errIncompleteStream = errors.New("server: stream ended before every choice finished")
	// errBadDelta means the backend sent a delta the request cannot have produced.
	errBadDelta = errors.New("server: unexpected delta from backend")
	// errNotAdmitted means a request was refused a slot to run, or its client left the queue.
	errNotAdmitted = errors.New("server: request not admitted")
)

// apiError is an error the client sees: an OpenAI error body and the HTTP status carrying it.
type apiError struct {
	Status  int
	Type    string
	Param   string // empty means null
	Message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("server: %d %s: %s", e.Status, e.Type, e.Message)
}

// errorf returns an apiError of the given status, with the type the status implies.
func errorf(status int, param, format string, args ...any) *apiError {
	return &apiError{Status: status, Type: errorType(status), Param: param, Message: fmt.Sprintf(format, args...)}
}

// badRequest returns a 400 error about param.
func badRequest(param, format string, args ...any) *apiError {
	return errorf(http.StatusBadRequest, param, format, args...)
}

// errorType names the error type of a status the way vLLM and the OpenAI clients do.
func errorType(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "BadRequestError"
	case http.StatusUnauthorized:
		return "AuthenticationError"
	case http.StatusForbidden:
		return "PermissionDeniedError"
	case http.StatusNotFound:
		return "NotFoundError"
	case http.StatusMethodNotAllowed:
		return "MethodNotAllowedError"
	case http.StatusRequestEntityTooLarge:
		return "RequestTooLargeError"
	case http.StatusUnprocessableEntity:
		return "UnprocessableEntityError"
	case http.StatusTooManyRequests:
		return "RateLimitError"
	case http.StatusNotImplemented:
		return "NotImplementedError"
	case http.StatusServiceUnavailable:
		return "ServiceUnavailableError"
	}
	if status >= 500 {
		return "InternalServerError"
	}
	return "BadRequestError"
}

// toAPIError maps an error from the backend to what the client sees. It returns nil when the
// client is gone (the request context was cancelled) and there is nobody to answer.
func toAPIError(err error) *apiError {
	var ae *apiError
	var re *llm.RequestError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &re):
		status := re.Status
		if status < 400 || status > 599 {
			status = http.StatusInternalServerError
		}
		typ := re.Type
		if typ == "" {
			typ = errorType(status)
		}
		return &apiError{Status: status, Type: typ, Param: re.Param, Message: re.Message}
	case errors.Is(err, llm.ErrEngineDead), errors.Is(err, llm.ErrClosed),
		errors.Is(err, llm.ErrSlowConsumer):
		return errorf(http.StatusServiceUnavailable, "", "%s", err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return nil
	}
	return errorf(http.StatusInternalServerError, "", "Internal server error")
}

// errorBody is the JSON shape of an error: {"error":{"message","type","param","code"}}.
type errorBody struct {
	Error errorInfo `json:"error"`
}

type errorInfo struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    int     `json:"code"`
}

func (e *apiError) body() errorBody {
	b := errorBody{Error: errorInfo{Message: e.Message, Type: e.Type, Code: e.Status}}
	if e.Param != "" {
		b.Error.Param = &e.Param
	}
	return b
}

// writeError answers with e as a JSON error body.
func writeError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.Status, e.body())
}

// writeJSON answers with v encoded as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		// Only our own response types reach here, and they always encode.
		panic(fmt.Errorf("server: encode response: %w", err))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
