package server

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"

	"github.com/govllm/govllm/llm"
)

// Structured outputs and the token constraints (logit_bias, allowed_token_ids, bad_words) of
// chat and text completions. Two request fields constrain the output: OpenAI's response_format
// and vLLM's structured_outputs; at most one of them may constrain a request. Either becomes
// llm.SamplingParams.StructuredOutputs with Param naming the field it came from, so that the
// backend's error about a schema that does not compile names what the client sent.

// responseFormat is "response_format": {"type":"text"}, {"type":"json_object"} or
// {"type":"json_schema","json_schema":{...}}.
type responseFormat struct {
	Type       string          `json:"type"`
	JSONSchema *jsonSchemaSpec `json:"json_schema"`
}

// jsonSchemaSpec is response_format.json_schema.
type jsonSchemaSpec struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	Schema      json.RawMessage `json:"schema"`
	Strict      *bool           `json:"strict"`
}

// structuredOutputs is vLLM's "structured_outputs" (StructuredOutputsParams). Exactly one of
// JSON, Regex, Choice, Grammar and JSONObject constrains the output; vLLM's other knobs are
// refused: the engine has no way to apply them.
type structuredOutputs struct {
	JSON       json.RawMessage `json:"json"` // a schema: an object, or a string holding one
	Regex      *string         `json:"regex"`
	Choice     []string        `json:"choice"`
	Grammar    *string         `json:"grammar"`
	JSONObject *bool           `json:"json_object"`

	DisableFallback             *bool           `json:"disable_fallback"`
	DisableAnyWhitespace        *bool           `json:"disable_any_whitespace"`
	DisableAdditionalProperties *bool           `json:"disable_additional_properties"`
	WhitespacePattern           *string         `json:"whitespace_pattern"`
	StructuralTag               json.RawMessage `json:"structural_tag"`
}

// isNull reports whether raw is absent or JSON null.
func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || bytes.Equal(raw, []byte("null"))
}

// isObject reports whether raw is a JSON object.
func isObject(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '{' && json.Valid(raw)
}

// compactJSON returns raw without insignificant whitespace; raw must be valid JSON.
func compactJSON(raw json.RawMessage) json.RawMessage {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return bytes.TrimSpace(raw)
	}
	return b.Bytes()
}

// toConstraint converts response_format; nil means no constraint ({"type":"text"}).
func (f *responseFormat) toConstraint() (*llm.StructuredOutputs, *apiError) {
	const param = "response_format"
	switch f.Type {
	case "text":
		return nil, nil
	case "json_object":
		return &llm.StructuredOutputs{JSONObject: true, Param: param}, nil
	case "json_schema":
		s := f.JSONSchema
		switch {
		case s == nil:
			return nil, badRequest("response_format.json_schema", "response_format.json_schema is required when response_format.type is \"json_schema\".")
		case s.Name == "":
			return nil, badRequest("response_format.json_schema.name", "response_format.json_schema.name is required.")
		case isNull(s.Schema):
			// OpenAI's schema is optional and means any JSON object.
			return &llm.StructuredOutputs{JSONObject: true, Param: param}, nil
		case !isObject(s.Schema):
			return nil, badRequest("response_format.json_schema.schema", "response_format.json_schema.schema must be a JSON object (a JSON schema).")
		}
		return &llm.StructuredOutputs{JSON: compactJSON(s.Schema), Param: param}, nil
	case "structural_tag":
		return nil, badRequest("response_format", "response_format type \"structural_tag\" is not supported.")
	case "":
		return nil, badRequest("response_format.type", "response_format.type is required: one of \"text\", \"json_object\" and \"json_schema\".")
	}
	return nil, badRequest("response_format.type", "response_format.type must be one of \"text\", \"json_object\" and \"json_schema\", got %q.", f.Type)
}

// toConstraint converts structured_outputs.
func (so *structuredOutputs) toConstraint() (*llm.StructuredOutputs, *apiError) {
	const param = "structured_outputs"
	for _, k := range []struct {
		name string
		set  bool
	}{
		{"disable_fallback", so.DisableFallback != nil && *so.DisableFallback},
		{"disable_any_whitespace", so.DisableAnyWhitespace != nil && *so.DisableAnyWhitespace},
		{"disable_additional_properties", so.DisableAdditionalProperties != nil && *so.DisableAdditionalProperties},
		{"whitespace_pattern", so.WhitespacePattern != nil && *so.WhitespacePattern != ""},
		{"structural_tag", !isNull(so.StructuralTag)},
	} {
		if k.set {
			return nil, badRequest(param+"."+k.name, "structured_outputs.%s is not supported.", k.name)
		}
	}
	out := &llm.StructuredOutputs{Param: param}
	n := 0
	if !isNull(so.JSON) {
		n++
		schema := bytes.TrimSpace(so.JSON)
		if schema[0] == '"' { // vLLM also takes the schema as a JSON text
			var s string
			if err := json.Unmarshal(schema, &s); err != nil {
				return nil, badRequest(param+".json", "structured_outputs.json is not a valid string: %v.", err)
			}
			schema = bytes.TrimSpace([]byte(s))
		}
		if !isObject(schema) {
			return nil, badRequest(param+".json", "structured_outputs.json must be a JSON schema: an object, or a string holding one.")
		}
		out.JSON = compactJSON(schema)
	}
	if so.Regex != nil {
		n++
		if *so.Regex == "" {
			return nil, badRequest(param+".regex", "structured_outputs.regex must not be empty.")
		}
		out.Regex = *so.Regex
	}
	if so.Choice != nil {
		n++
		if len(so.Choice) == 0 {
			return nil, badRequest(param+".choice", "structured_outputs.choice must not be empty.")
		}
		out.Choice = so.Choice
	}
	if so.Grammar != nil {
		n++
		if *so.Grammar == "" {
			return nil, badRequest(param+".grammar", "structured_outputs.grammar must not be empty.")
		}
		out.Grammar = *so.Grammar
	}
	if so.JSONObject != nil && *so.JSONObject {
		n++
		out.JSONObject = true
	}
	if n != 1 {
		return nil, badRequest(param, "structured_outputs must set exactly one of json, regex, choice, grammar and json_object, got %d.", n)
	}
	return out, nil
}

// constraints applies response_format, structured_outputs, logit_bias, allowed_token_ids and
// bad_words to sp. A structured-output constraint needs a backend that applies it.
func (c *samplingRequest) constraints(sp *llm.SamplingParams, m llm.ModelInfo) *apiError {
	var fromFormat, fromSO *llm.StructuredOutputs
	var e *apiError
	if c.ResponseFormat != nil {
		if fromFormat, e = c.ResponseFormat.toConstraint(); e != nil {
			return e
		}
	}
	if c.StructuredOutputs != nil {
		if fromSO, e = c.StructuredOutputs.toConstraint(); e != nil {
			return e
		}
	}
	switch {
	case fromFormat != nil && fromSO != nil:
		return badRequest("structured_outputs", "response_format and structured_outputs cannot both constrain a request; set one.")
	case fromFormat != nil:
		sp.StructuredOutputs = fromFormat
	case fromSO != nil:
		sp.StructuredOutputs = fromSO
	}
	if so := sp.StructuredOutputs; so != nil && !m.StructuredOutputs {
		return badRequest(so.Param, "%s is not supported by this server: its backend (%s) does not apply structured outputs.", so.Param, backendName(m))
	}

	bias, e := parseLogitBias(c.LogitBias)
	if e != nil {
		return e
	}
	sp.LogitBias = bias
	if c.AllowedTokenIDs != nil {
		if len(c.AllowedTokenIDs) == 0 {
			return badRequest("allowed_token_ids", "allowed_token_ids must not be empty.")
		}
		for _, id := range c.AllowedTokenIDs {
			if id < 0 {
				return badRequest("allowed_token_ids", "allowed_token_ids must be non-negative, got %d.", id)
			}
		}
		sp.AllowedTokenIDs = c.AllowedTokenIDs
	}
	for _, w := range c.BadWords {
		if w == "" {
			return badRequest("bad_words", "bad_words cannot contain an empty string.")
		}
	}
	if len(c.BadWords) > 0 {
		sp.BadWords = c.BadWords
	}
	if !m.StructuredOutputs { // a backend that applies no constraints would ignore these
		for _, f := range []struct {
			name string
			set  bool
		}{{"logit_bias", len(sp.LogitBias) > 0}, {"allowed_token_ids", sp.AllowedTokenIDs != nil}, {"bad_words", sp.BadWords != nil}} {
			if f.set {
				return badRequest(f.name, "%s is not supported by this server: its backend (%s) does not apply token constraints.", f.name, backendName(m))
			}
		}
	}
	return nil
}

// backendName names m's backend in messages.
func backendName(m llm.ModelInfo) string {
	if m.Backend == "" {
		return "unknown"
	}
	return m.Backend
}

// parseLogitBias decodes "logit_bias": null or an object mapping token ids, written as decimal
// strings, to numbers in [-100, 100]. An empty object is no bias.
func parseLogitBias(raw json.RawMessage) (map[int32]float64, *apiError) {
	const param = "logit_bias"
	if isNull(raw) {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, badRequest(param, "logit_bias must be an object mapping token ids to numbers.")
	}
	if len(m) == 0 {
		return nil, nil
	}
	out := make(map[int32]float64, len(m))
	for k, v := range m {
		id, err := strconv.ParseInt(k, 10, 32)
		if err != nil || id < 0 {
			return nil, badRequest(param, "logit_bias keys must be token ids (non-negative integers), got %q.", k)
		}
		var b float64
		if err := json.Unmarshal(v, &b); err != nil || math.IsNaN(b) {
			return nil, badRequest(param, "logit_bias[%q] must be a number, got %s.", k, bytes.TrimSpace(v))
		}
		if b < -llm.MaxLogitBias || b > llm.MaxLogitBias {
			return nil, badRequest(param, "logit_bias[%q] must be in [-%v, %v], got %v.", k, llm.MaxLogitBias, llm.MaxLogitBias, b)
		}
		out[int32(id)] = b
	}
	return out, nil
}
