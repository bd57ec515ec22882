package server

import (
	"encoding/json"
	"strings"

	"github.com/govllm/govllm/llm"
)

// A forced tool choice ("required" or a named function) constrains the output to JSON through
// structured outputs (tools.go); forcedCalls turns that JSON into tool calls as it streams.
//
//   - Named function: the whole output is the arguments of that function, a JSON object: one
//     call.
//   - "required": the output is an array of objects {"name": <a tool>, "parameters": <its
//     arguments>}, in either key order: one call per element.
//
// Each call's first piece carries its index, a fresh id (toolCallIDPrefix, vLLM's format),
// type "function" and the name; the arguments are the raw JSON text of the arguments value as
// it streams, so that the fragments concatenate to exactly that text (leading and trailing
// whitespace around the value are not part of it). When "parameters" comes before "name", the
// arguments are held until the name is known. The text may be split anywhere: inside a string,
// an escape, a key or a number.
//
// Output that is not what the schema asks for (a backend that did not apply the constraint) or
// that is cut short (finish_reason "length") does not become broken calls: the text from the
// first byte no piece stands for goes out as content, and the finish reason stays the
// engine's. Only a complete value makes the finish reason "tool_calls". Streamed, the pieces
// already sent stay sent; not streamed (parseForced), the whole text is the content and there
// are no calls.
type forcedCalls struct {
	named string        // the named function; "" for "required"
	newID func() string // the id of each call

	text      []byte // everything fed
	accounted int    // text[:accounted] went out, as pieces or as content
	failed    bool   // the text is not the JSON asked for: the rest is content
	done      bool   // the top-level value is complete

	// The scanner: state, the open containers ('{' or '['), the rest of a literal, the hex
	// digits left in a \u escape, the text of a number.
	state  scanState
	stack  []byte
	lit    string
	hex    int
	strKey bool // the string being scanned is an object key
	num    []byte

	// The call being read, for "required" (calls counts those started).
	calls     int
	key       []byte // the raw key being read, in a call object
	curKey    string
	haveName  bool
	haveArgs  bool
	name      string
	capture   int    // what the value being read is: captureNone, captureName, captureArgs
	nameRaw   []byte // the raw name string
	held      []byte // the arguments, held until the name is known
	announced bool   // the call's first piece went out

	out []llm.ToolCallDelta // the pieces of the current feed
	cur *pieceBuf
}

type pieceBuf struct {
	d    llm.ToolCallDelta
	args []byte
}

// What a value being scanned is captured as.
const (
	captureNone = iota
	captureName
	captureArgs
)

type scanState uint8

// Scanner states.
const (
	scValue    scanState = iota // a value is expected
	scArrFirst                  // after '[': a value or ']'
	scArrNext                   // after an element: ',' or ']'
	scObjFirst                  // after '{': a key or '}'
	scObjKey                    // after ',': a key
	scColon                     // after a key: ':'
	scObjNext                   // after a member: ',' or '}'
	scString                    // in a string
	scEscape                    // after '\' in a string
	scUnicode                   // in the hex digits of \u
	scNumber                    // in a number
	scLiteral                   // in true, false or null
	scDone                      // after the top-level value
)

// newForcedCalls returns the extractor of one choice's forced calls.
func newForcedCalls(f *forcedTools, newID func() string) *forcedCalls {
	return &forcedCalls{named: f.named, newID: newID}
}

func isSpace(b byte) bool { return b == ' ' || b == '\t' || b == '\n' || b == '\r' }

func isNumberByte(b byte) bool {
	return b >= '0' && b <= '9' || b == '-' || b == '+' || b == '.' || b == 'e' || b == 'E'
}

// feed scans the next text of the choice and returns the pieces of calls it starts or
// continues, and the text that goes out as content instead (output that is not a call).
func (x *forcedCalls) feed(text string) ([]llm.ToolCallDelta, string) {
	start := len(x.text)
	x.text = append(x.text, text...)
	if x.failed {
		x.accounted = len(x.text)
		return nil, text
	}
	x.out = x.out[:0]
	for i := start; i < len(x.text) && !x.failed; {
		if x.step(x.text[i], i) {
			i++
		}
	}
	x.flush()
	var pieces []llm.ToolCallDelta
	if len(x.out) > 0 {
		pieces = append(pieces, x.out...)
	}
	if x.failed {
		content := string(x.text[x.accounted:])
		x.accounted = len(x.text)
		return pieces, content
	}
	return pieces, ""
}

// finish ends the choice's text. ok reports whether it held complete calls; if not, content is
// the text not yet sent.
func (x *forcedCalls) finish() (content string, ok bool) {
	if x.state == scNumber && len(x.stack) == 0 && !x.failed {
		x.endNumber(len(x.text))
	}
	if x.done && !x.failed {
		return "", true
	}
	content = string(x.text[x.accounted:])
	x.accounted = len(x.text)
	return content, false
}

// fail marks the text as not the JSON asked for.
func (x *forcedCalls) fail() { x.failed = true }

// step scans byte b at offset i and reports whether it took it: a number ends at the byte
// after it, which is then scanned again.
func (x *forcedCalls) step(b byte, i int) bool {
	if isSpace(b) && x.state != scString && x.state != scNumber {
		if x.state == scEscape || x.state == scUnicode || x.state == scLiteral {
			x.fail()
		}
		x.keep(b, i) // inside a captured value: part of its text
		return true
	}
	switch x.state {
	case scValue, scArrFirst:
		if x.state == scArrFirst && b == ']' {
			x.close(b, i)
			return true
		}
		x.valueStart(b, i)
		if x.failed {
			return true
		}
		x.keep(b, i)
		switch {
		case b == '{':
			x.stack = append(x.stack, '{')
			x.state = scObjFirst
		case b == '[':
			x.stack = append(x.stack, '[')
			x.state = scArrFirst
		case b == '"':
			x.strKey = false
			x.state = scString
		case b == '-' || b >= '0' && b <= '9':
			x.num = append(x.num[:0], b)
			x.state = scNumber
		case b == 't':
			x.lit, x.state = "rue", scLiteral
		case b == 'f':
			x.lit, x.state = "alse", scLiteral
		case b == 'n':
			x.lit, x.state = "ull", scLiteral
		default:
			x.fail()
		}
	case scArrNext:
		switch b {
		case ',':
			x.keep(b, i)
			x.state = scValue
		case ']':
			x.close(b, i)
		default:
			x.fail()
		}
	case scObjFirst, scObjKey:
		switch {
		case b == '}' && x.state == scObjFirst:
			x.close(b, i)
		case b == '"':
			x.keep(b, i)
			x.strKey = true
			x.key = append(x.key[:0], b)
			x.state = scString
		default:
			x.fail()
		}
	case scColon:
		if b != ':' {
			x.fail()
			return true
		}
		x.keep(b, i)
		x.state = scValue
	case scObjNext:
		switch b {
		case ',':
			x.keep(b, i)
			x.state = scObjKey
		case '}':
			x.close(b, i)
		default:
			x.fail()
		}
	case scString, scEscape, scUnicode:
		if !x.stringByteOK(b) {
			x.fail()
			return true
		}
		x.keep(b, i)
		if x.strKey {
			x.key = append(x.key, b)
		}
		switch x.state {
		case scString:
			switch b {
			case '"':
				if x.strKey {
					x.keyEnd()
					x.state = scColon
				} else {
					x.valueEnd(i)
				}
			case '\\':
				x.state = scEscape
			}
		case scEscape:
			if x.state = scString; b == 'u' {
				x.hex, x.state = 4, scUnicode
			}
		case scUnicode:
			if x.hex--; x.hex == 0 {
				x.state = scString
			}
		}
	case scNumber:
		if isNumberByte(b) {
			x.keep(b, i)
			x.num = append(x.num, b)
			return true
		}
		x.endNumber(i)
		return false
	case scLiteral:
		if b != x.lit[0] {
			x.fail()
			return true
		}
		x.keep(b, i)
		if x.lit = x.lit[1:]; x.lit == "" {
			x.valueEnd(i)
		}
	case scDone:
		x.fail() // text after the value
	}
	return true
}

// stringByteOK reports whether b may come next in the string being scanned.
func (x *forcedCalls) stringByteOK(b byte) bool {
	switch x.state {
	case scEscape:
		return strings.IndexByte(`"\\/bfnrtu`, b) >= 0
	case scUnicode:
		return b >= '0' && b <= '9' || b >= 'a' && b <= 'f' || b >= 'A' && b <= 'F'
	}
	return b >= 0x20
}

// close takes the closing bracket b at offset i of the innermost container.
func (x *forcedCalls) close(b byte, i int) {
	x.keep(b, i)
	x.stack = x.stack[:len(x.stack)-1]
	x.valueEnd(i)
}

// endNumber ends the number being scanned before offset i.
func (x *forcedCalls) endNumber(i int) {
	if !json.Valid(x.num) {
		x.fail()
		return
	}
	x.valueEnd(i - 1)
}

// afterValue sets the state that follows a complete value.
func (x *forcedCalls) afterValue() {
	switch {
	case len(x.stack) == 0:
		x.state = scDone
	case x.stack[len(x.stack)-1] == '[':
		x.state = scArrNext
	default:
		x.state = scObjNext
	}
}

// keep takes byte b (offset i) of the value being captured, if any: the name or the arguments
// of the call being read.
func (x *forcedCalls) keep(b byte, i int) {
	switch x.capture {
	case captureName:
		x.nameRaw = append(x.nameRaw, b)
	case captureArgs:
		if x.announced {
			x.emitArgs(b, i)
		} else {
			x.held = append(x.held, b)
		}
	}
}

// valueStart is called at the first byte b (offset i) of a value, before the scanner takes it.
func (x *forcedCalls) valueStart(b byte, i int) {
	depth := len(x.stack)
	if x.named != "" {
		if depth == 0 {
			if b != '{' { // the arguments are an object
				x.fail()
				return
			}
			x.name, x.haveName = x.named, true
			x.announce(i)
			x.capture = captureArgs
		}
		return
	}
	switch depth {
	case 0:
		if b != '[' {
			x.fail()
		}
	case 1:
		if b != '{' {
			x.fail()
			return
		}
		x.haveName, x.haveArgs, x.announced, x.name, x.curKey = false, false, false, "", ""
		x.nameRaw, x.held = x.nameRaw[:0], x.held[:0]
	case 2:
		switch x.curKey {
		case "name":
			if b != '"' {
				x.fail()
				return
			}
			x.capture = captureName
		case "parameters":
			x.capture = captureArgs
		}
	}
}

// valueEnd is called when the value whose last byte is at offset i is complete (and closed on
// the stack).
func (x *forcedCalls) valueEnd(i int) {
	depth := len(x.stack)
	x.afterValue()
	if x.named != "" {
		if depth == 0 {
			x.capture, x.haveArgs, x.done = captureNone, true, true
			x.accounted = i + 1
		}
		return
	}
	switch depth {
	case 0:
		if x.calls == 0 { // minItems is 1
			x.fail()
			return
		}
		x.done = true
		x.accounted = i + 1
	case 1:
		if !x.haveName || !x.haveArgs {
			x.fail()
			return
		}
		x.accounted = i + 1
	case 2:
		switch x.capture {
		case captureName:
			var name string
			if err := json.Unmarshal(x.nameRaw, &name); err != nil || name == "" {
				x.fail()
				return
			}
			x.name, x.haveName, x.capture = name, true, captureNone
			x.announce(i + 1)
			if x.haveArgs { // "parameters" came first
				for _, c := range x.held {
					x.emitArgs(c, i)
				}
			}
		case captureArgs:
			x.haveArgs, x.capture = true, captureNone
		}
	}
}

// keyEnd is called at the closing quote of a key.
func (x *forcedCalls) keyEnd() {
	x.strKey = false
	if x.named != "" || len(x.stack) != 2 {
		return
	}
	var k string
	if err := json.Unmarshal(x.key, &k); err != nil {
		x.fail()
		return
	}
	switch {
	case k == "name" && !x.haveName, k == "parameters" && !x.haveArgs:
		x.curKey = k
	default: // additionalProperties is false, and a key may not repeat
		x.fail()
	}
}

// announce starts the first piece of a new call; the text before offset i is accounted for.
func (x *forcedCalls) announce(i int) {
	x.flush()
	x.cur = &pieceBuf{d: llm.ToolCallDelta{Index: x.calls, ID: x.newID(), Type: "function", Name: x.name}}
	x.calls++
	x.announced = true
	x.accounted = i
}

// emitArgs appends byte b, at offset i, to the arguments of the call being read.
func (x *forcedCalls) emitArgs(b byte, i int) {
	idx := x.calls - 1
	if x.cur == nil || x.cur.d.Index != idx {
		x.flush()
		x.cur = &pieceBuf{d: llm.ToolCallDelta{Index: idx}}
	}
	x.cur.args = append(x.cur.args, b)
	x.accounted = i + 1
}

// flush moves the piece being built to the feed's output.
func (x *forcedCalls) flush() {
	if x.cur == nil {
		return
	}
	x.cur.d.Arguments = string(x.cur.args)
	x.out = append(x.out, x.cur.d)
	x.cur = nil
}

// parseForced reads a whole forced output (not streamed): the calls, or ok false when the text
// is not complete calls, which then goes out as content.
func parseForced(f *forcedTools, text string, newID func() string) (calls []llm.ToolCall, ok bool) {
	x := newForcedCalls(f, newID)
	pieces, _ := x.feed(text)
	if _, ok := x.finish(); !ok {
		return nil, false
	}
	return mergeToolCalls(nil, pieces), true
}

// mergeToolCalls adds pieces to calls: a piece with an id starts call Index, the others
// append to its arguments.
func mergeToolCalls(calls []llm.ToolCall, pieces []llm.ToolCallDelta) []llm.ToolCall {
	for _, p := range pieces {
		for p.Index >= len(calls) {
			calls = append(calls, llm.ToolCall{Type: "function"})
		}
		c := &calls[p.Index]
		if p.ID != "" {
			c.ID = p.ID
		}
		if p.Type != "" {
			c.Type = p.Type
		}
		c.Function.Name += p.Name
		c.Function.Arguments += p.Arguments
	}
	return calls
}
