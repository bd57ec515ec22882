package server

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// wantCall is a call the extractor must find: its name and the exact text of its arguments.
type wantCall struct{ name, args string }

var forcedCases = []struct {
	name  string
	named string // "" for tool_choice "required"
	text  string
	want  []wantCall
}{
	{
		name:  "named, nested, escapes and brackets in strings",
		named: "get",
		text:  " \n{\"city\": \"Pa\\\"ris}\", \"n\": {\"a\": [1, -2.5e3, true, null, false], \"s\": \"x}\\\\\\u00e9{]\"}} \n",
		want:  []wantCall{{"get", "{\"city\": \"Pa\\\"ris}\", \"n\": {\"a\": [1, -2.5e3, true, null, false], \"s\": \"x}\\\\\\u00e9{]\"}}"}},
	},
	{
		name:  "named, empty object",
		named: "f",
		text:  `{}`,
		want:  []wantCall{{"f", `{}`}},
	},
	{
		name: "required, one call",
		text: `[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}]`,
		want: []wantCall{{"get_weather", `{"city": "Paris", "days": 3}`}},
	},
	{
		name: "required, parallel, parameters before name, escaped name",
		text: "[ {\"parameters\" : {\"q\": \"a,b]\\\"}\", \"k\": [{}, []]}, \"name\": \"se\\u0061rch\"} ,\n{\"name\":\"get\",\"parameters\":{\"x\":0.5}} ]",
		want: []wantCall{{"search", "{\"q\": \"a,b]\\\"}\", \"k\": [{}, []]}"}, {"get", `{"x":0.5}`}},
	},
	{
		name: "required, three calls, compact",
		text: `[{"name":"a","parameters":{}},{"name":"b","parameters":{"v":"\\"}},{"parameters":{"w":[1,2]},"name":"c"}]`,
		want: []wantCall{{"a", `{}`}, {"b", `{"v":"\\"}`}, {"c", `{"w":[1,2]}`}},
	},
}

// runForced feeds parts to a fresh extractor and returns the calls its pieces make, the content
// it gave back, and whether the output was complete calls. It checks the shape of the pieces:
// the first of each call carries id, type and name, later ones only arguments.
func runForced(t *testing.T, named string, parts []string) ([]llm.ToolCall, string, bool) {
	t.Helper()
	n := 0
	x := newForcedCalls(&forcedTools{named: named}, func() string { n++; return fmt.Sprintf("id%d", n) })
	var calls []llm.ToolCall
	var content strings.Builder
	for _, p := range parts {
		pieces, c := x.feed(p)
		content.WriteString(c)
		for k, pc := range pieces {
			if pc.Index == len(calls) {
				require.Equal(t, fmt.Sprintf("id%d", pc.Index+1), pc.ID, "first piece of call %d", pc.Index)
				require.Equal(t, "function", pc.Type)
				require.NotEmpty(t, pc.Name)
			} else {
				require.Equal(t, len(calls)-1, pc.Index, "pieces go to the last call")
				require.Empty(t, pc.ID+pc.Type+pc.Name, "a later piece carries only arguments")
				require.NotEmpty(t, pc.Arguments)
			}
			if k > 0 {
				require.NotEqual(t, pieces[k-1].Index, pc.Index, "one piece per call and feed")
			}
			calls = mergeToolCalls(calls, pieces[k:k+1])
		}
	}
	rest, ok := x.finish()
	content.WriteString(rest)
	return calls, content.String(), ok
}

func toWant(calls []llm.ToolCall) []wantCall {
	out := []wantCall{}
	for _, c := range calls {
		out = append(out, wantCall{c.Function.Name, c.Function.Arguments})
	}
	return out
}

// TestForcedCallsEverySplit splits each output at every byte (in two, in three, and byte by
// byte): the pieces always make exactly the calls, whose arguments are the exact JSON text.
func TestForcedCallsEverySplit(t *testing.T) {
	t.Parallel()
	for _, tt := range forcedCases {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			for _, w := range tt.want {
				require.True(t, json.Valid([]byte(w.args)), w.args)
			}
			check := func(parts []string) {
				calls, content, ok := runForced(t, tt.named, parts)
				require.True(t, ok, "parts %q", parts)
				require.Empty(t, content, "parts %q", parts)
				require.Equal(t, tt.want, toWant(calls), "parts %q", parts)
			}
			text := tt.text
			check([]string{text})
			var bytewise []string
			for i := range len(text) {
				bytewise = append(bytewise, text[i:i+1])
			}
			check(bytewise)
			for i := 0; i <= len(text); i++ {
				check([]string{text[:i], text[i:]})
				for j := i; j <= len(text); j += 7 {
					check([]string{text[:i], text[i:j], text[j:]})
				}
			}
			// Not streamed: the whole text at once.
			got, ok := parseForced(&forcedTools{named: tt.named}, text, func() string { return "id" })
			require.True(t, ok)
			require.Equal(t, tt.want, toWant(got))
		})
	}
}

// TestForcedCallsCutShort cuts each output at every byte: no prefix of a value is complete
// calls, and what went out (the arguments so far and the content) never breaks a call.
func TestForcedCallsCutShort(t *testing.T) {
	t.Parallel()
	for _, tt := range forcedCases {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			end := strings.LastIndexAny(tt.text, "}]") + 1
			for i := range end {
				calls, content, ok := runForced(t, tt.named, []string{tt.text[:i]})
				require.False(t, ok, "prefix %q", tt.text[:i])
				require.LessOrEqual(t, len(calls), len(tt.want))
				for k, c := range calls {
					require.Equal(t, tt.want[k].name, c.Function.Name)
					require.True(t, strings.HasPrefix(tt.want[k].args, c.Function.Arguments), "prefix %q: call %d", tt.text[:i], k)
				}
				require.True(t, strings.HasSuffix(tt.text[:i], content), "content is the tail not sent as calls")
				_, ok = parseForced(&forcedTools{named: tt.named}, tt.text[:i], func() string { return "id" })
				require.False(t, ok)
			}
		})
	}
}

// TestForcedCallsInvalid checks outputs that are not what the schema asks for: they are content.
func TestForcedCallsInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, named, text string
		calls             int // calls announced before the output went wrong
		content           string
	}{
		{name: "prose", text: `Sure! I will call get.`, content: `Sure! I will call get.`},
		{name: "named prose", named: "f", text: `Sure`, content: `Sure`},
		{name: "empty array", text: `[]`, content: `[]`},
		{name: "not objects", text: `[1]`, content: `[1]`},
		{name: "missing parameters", text: `[{"name":"f"}]`, calls: 1, content: `}]`},
		{name: "extra key", text: `[{"name":"f","parameters":{},"x":1}]`, calls: 1, content: `,"x":1}]`},
		{name: "repeated key", text: `[{"name":"f","name":"g","parameters":{}}]`, calls: 1, content: `,"name":"g","parameters":{}}]`},
		{name: "name not a string", text: `[{"name":1,"parameters":{}}]`, content: `[{"name":1,"parameters":{}}]`},
		{name: "text after the value", named: "f", text: `{"a":1} ok`, calls: 1, content: ` ok`},
		{name: "bad escape", named: "f", text: `{"a":"\q"}`, calls: 1, content: `q"}`},
		{name: "named not an object", named: "f", text: `[1]`, content: `[1]`},
		{name: "bad number", named: "f", text: `{"a":1.2.3}`, calls: 1, content: `}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			for _, parts := range [][]string{{tt.text}, strings.SplitAfter(tt.text, "")} {
				calls, content, ok := runForced(t, tt.named, parts)
				require.False(t, ok)
				require.Len(t, calls, tt.calls)
				require.True(t, strings.HasSuffix(tt.text, content))
				require.Contains(t, content, tt.content, "parts %q", parts)
			}
			_, ok := parseForced(&forcedTools{named: tt.named}, tt.text, func() string { return "id" })
			require.False(t, ok)
		})
	}
}

// FuzzForcedCalls feeds arbitrary output, split at an arbitrary byte, to the extractor: it never
// panics, streamed and whole reads agree, and complete calls always have JSON arguments.
func FuzzForcedCalls(f *testing.F) {
	for _, c := range forcedCases {
		f.Add(c.named != "", c.text, uint(len(c.text)/2))
	}
	f.Add(false, `[{"name":"a","parameters":{"x":"\u12"}}]`, uint(3))
	f.Fuzz(func(t *testing.T, named bool, text string, split uint) {
		name := ""
		if named {
			name = "f"
		}
		k := int(split % uint(len(text)+1))
		calls, _, ok := runForced(t, name, []string{text[:k], text[k:]})
		whole, wholeOK := parseForced(&forcedTools{named: name}, text, func() string { return "id" })
		require.Equal(t, wholeOK, ok)
		if !ok {
			return
		}
		require.Equal(t, toWant(whole), toWant(calls))
		for _, c := range calls {
			require.True(t, json.Valid([]byte(c.Function.Arguments)), c.Function.Arguments)
			require.NotEmpty(t, c.Function.Name)
		}
	})
}
