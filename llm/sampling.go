package llm

import "math"

// SamplingParams controls decoding for one request. A nil pointer means "unset": the engine
// applies the model's default (its generation_config.json, as vllm serve does), else the
// default noted on the field. A set pointer is sent as is, so a client can switch a model's
// default off (TopK 0, TopP 1, RepetitionPenalty 1).
type SamplingParams struct {
	// MaxTokens caps the generated tokens per choice; 0 (no valid cap) means unset: the
	// model's default, else until the context is full.
	MaxTokens int `json:"max_tokens,omitempty"`
	// Temperature scales the logits; 0 is greedy. Unset means the model's default, else 1.
	Temperature *float64 `json:"temperature,omitempty"`
	// TopP is the nucleus mass in (0, 1]; 1 is off. Unset means the model's default, else 1.
	TopP *float64 `json:"top_p,omitempty"`
	// TopK keeps the k most likely tokens; 0 (or -1) is off. Unset means the model's
	// default, else off.
	TopK *int `json:"top_k,omitempty"`
	// MinP drops tokens less likely than MinP times the most likely one; 0 is off. Unset
	// means the model's default, else off.
	MinP *float64 `json:"min_p,omitempty"`
	// RepetitionPenalty divides positive (multiplies negative) logits of tokens seen in the
	// prompt or the output; 1 is off. Unset means the model's default, else off.
	RepetitionPenalty *float64 `json:"repetition_penalty,omitempty"`
	// Seed makes sampling reproducible for this request.
	Seed *int64 `json:"seed,omitempty"`
	// Stop strings end a choice; the matched string is not returned.
	Stop []string `json:"stop,omitempty"`
	// StopTokenIDs end a choice when generated.
	StopTokenIDs []int32 `json:"stop_token_ids,omitempty"`
	// IgnoreEOS keeps generating past the end-of-sequence token.
	IgnoreEOS bool `json:"ignore_eos,omitempty"`
	// N is the number of choices, at most MaxChoices; 0 means 1.
	N int `json:"n,omitempty"`
	// PresencePenalty, in [-2, 2], is subtracted from the logit of every token already
	// generated; 0 means off.
	PresencePenalty float64 `json:"presence_penalty,omitempty"`
	// FrequencyPenalty, in [-2, 2], is subtracted from a token's logit once per time it was
	// generated; 0 means off.
	FrequencyPenalty float64 `json:"frequency_penalty,omitempty"`
	// MinTokens is the fewest tokens generated before EOS or a stop token may end a choice.
	MinTokens int `json:"min_tokens,omitempty"`
	// Logprobs, when set, asks for the log probability of every generated token and of the
	// *Logprobs most likely tokens at each position (0 to 20; Delta.Logprobs). Unset means none.
	Logprobs *int `json:"logprobs,omitempty"`
	// PromptLogprobs, when set, asks for the log probability of every prompt token after the
	// first and of the *PromptLogprobs most likely tokens at each position (0 to 20; vLLM's
	// prompt_logprobs). Unset means none.
	PromptLogprobs *int `json:"prompt_logprobs,omitempty"`
	// IncludeStopStrInOutput keeps a matched stop string (or stop token's text) in the output.
	IncludeStopStrInOutput bool `json:"include_stop_str_in_output,omitempty"`
	// SkipSpecialTokens drops special tokens from the text; nil means true (vLLM's default).
	SkipSpecialTokens *bool `json:"skip_special_tokens,omitempty"`
	// SpacesBetweenSpecialTokens puts spaces between added tokens in the text; nil means true.
	SpacesBetweenSpecialTokens *bool `json:"spaces_between_special_tokens,omitempty"`
	// StructuredOutputs, when set, constrains the output (a JSON schema, a regex, ...).
	StructuredOutputs *StructuredOutputs `json:"structured_outputs,omitempty"`
	// LogitBias adds a bias in [-100, 100] to the logits of token ids before sampling.
	LogitBias map[int32]float64 `json:"logit_bias,omitempty"`
	// AllowedTokenIDs, when non-empty, are the only tokens that may be sampled.
	AllowedTokenIDs []int32 `json:"allowed_token_ids,omitempty"`
	// BadWords are words (tokenized with and without a leading space) that may not be generated.
	BadWords []string `json:"bad_words,omitempty"`
}

// Validate checks the bounds every engine shares. They are the same as the HTTP layer's, so a
// request that passed the server never fails here.
func (sp *SamplingParams) Validate() error {
	switch {
	case sp.MaxTokens < 0:
		return invalid("max_tokens", "max_tokens must be at least 1, got %d", sp.MaxTokens)
	case sp.N < 0 || sp.N > MaxChoices:
		return invalid("n", "n must be between 1 and %d, got %d", MaxChoices, sp.N)
	case sp.Temperature != nil && !(*sp.Temperature >= 0 && *sp.Temperature <= MaxTemperature):
		return invalid("temperature", "temperature must be in [0, %v], got %v", MaxTemperature, *sp.Temperature)
	case sp.TopP != nil && !(*sp.TopP > 0 && *sp.TopP <= 1):
		return invalid("top_p", "top_p must be in (0, 1], got %v", *sp.TopP)
	case sp.TopK != nil && *sp.TopK < -1:
		return invalid("top_k", "top_k must be 0 or -1 (disable), or at least 1, got %d", *sp.TopK)
	case sp.MinP != nil && !(*sp.MinP >= 0 && *sp.MinP <= 1):
		return invalid("min_p", "min_p must be in [0, 1], got %v", *sp.MinP)
	case sp.RepetitionPenalty != nil && !(*sp.RepetitionPenalty > 0 && *sp.RepetitionPenalty <= MaxRepetitionPenalty):
		return invalid("repetition_penalty", "repetition_penalty must be in (0, %v], got %v", MaxRepetitionPenalty, *sp.RepetitionPenalty)
	case !penaltyOK(sp.PresencePenalty):
		return invalid("presence_penalty", "presence_penalty must be in [-2, 2], got %v", sp.PresencePenalty)
	case !penaltyOK(sp.FrequencyPenalty):
		return invalid("frequency_penalty", "frequency_penalty must be in [-2, 2], got %v", sp.FrequencyPenalty)
	case sp.MinTokens < 0:
		return invalid("min_tokens", "min_tokens must be non-negative, got %d", sp.MinTokens)
	case sp.MaxTokens > 0 && sp.MinTokens > sp.MaxTokens:
		return invalid("min_tokens", "min_tokens must be less than or equal to max_tokens=%d, got %d", sp.MaxTokens, sp.MinTokens)
	case sp.Logprobs != nil && (*sp.Logprobs < 0 || *sp.Logprobs > MaxLogprobs):
		return invalid("logprobs", "logprobs must be in [0, %d], got %d", MaxLogprobs, *sp.Logprobs)
	case sp.PromptLogprobs != nil && (*sp.PromptLogprobs < 0 || *sp.PromptLogprobs > MaxLogprobs):
		return invalid("prompt_logprobs", "prompt_logprobs must be in [0, %d], got %d", MaxLogprobs, *sp.PromptLogprobs)
	case sp.StructuredOutputs != nil && sp.StructuredOutputs.Set() != 1:
		return invalid("structured_outputs", "structured_outputs must set exactly one of json, json_object, regex, choice and grammar")
	}
	for id, b := range sp.LogitBias {
		if id < 0 || !(b >= -MaxLogitBias && b <= MaxLogitBias) {
			return invalid("logit_bias", "logit_bias maps token ids (>= 0) to biases in [-%v, %v], got %d: %v", MaxLogitBias, MaxLogitBias, id, b)
		}
	}
	for _, id := range sp.AllowedTokenIDs {
		if id < 0 {
			return invalid("allowed_token_ids", "allowed_token_ids must be non-negative, got %d", id)
		}
	}
	return nil
}

// Bounds of the sampling parameters, shared by the HTTP layer and Validate.
const (
	// MaxTemperature is the largest temperature accepted (OpenAI's bound).
	MaxTemperature = 2.0
	// MaxRepetitionPenalty is the largest repetition_penalty accepted; vLLM only requires it
	// positive, but beyond this it only turns logits into infinities.
	MaxRepetitionPenalty = 100.0
	// MaxLogprobs is the most top logprobs a position may ask for.
	MaxLogprobs = 20
	// MaxLogitBias bounds the magnitude of a logit_bias value (OpenAI's bound).
	MaxLogitBias = 100.0
)

func penaltyOK(v float64) bool { return v >= -2 && v <= 2 && !math.IsNaN(v) }

// Ptr returns a pointer to v: a set field of SamplingParams.
func Ptr[T any](v T) *T { return &v }
