package api

import "testing"

// TestBatchedCompletions runs batch_test.py against both backends: several prompts in one
// /v1/completions request (text and token ids, n=1 and n=2, streamed and not) answer as the
// same prompts alone do under greedy decoding, numbered prompt×n+j, with summed usage;
// stop_reason from a stop string and a stop token id; include_stop_str_in_output; and
// stream_options.continuous_usage_stats.
func TestBatchedCompletions(t *testing.T) {
	runPytest(t, "batch_test.py")
}
