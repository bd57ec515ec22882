package api

import "testing"

// TestAnthropicSDK runs anthropic_test.py (the pinned anthropic SDK: messages create and
// stream, forced tools, tool results, stop sequences, count_tokens, errors, x-api-key) against
// each backend's server.
func TestAnthropicSDK(t *testing.T) {
	runPytest(t, "anthropic_test.py")
}
