package api

import "testing"

// TestResponsesSDK runs responses_test.py (/v1/responses through the openai Python SDK) against
// each backend's server.
func TestResponsesSDK(t *testing.T) {
	runPytest(t, "responses_test.py")
}
