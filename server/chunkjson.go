package server

import (
	"strconv"
	"unicode/utf8"
)

// The content chunk of a streamed chat completion is the one event written per token, so it is
// encoded by hand into the SSE buffer instead of through encoding/json's reflection: the part
// before the choice's index is the same for every chunk of a call and is built once. The bytes
// are exactly what encoding/json writes for the same chatChunk (SetEscapeHTML(false));
// chunkjson_test.go checks that.

// appendContentChunk appends `data: <chunk>\n\n` for a content chunk of choice index carrying
// text, with no logprobs and no token ids.
func (s *sseWriter) appendContentChunk(c *call, index int, text string) {
	if c.chunkPrefix == nil {
		p := append([]byte(nil), sseData...)
		p = append(p, `{"id":`...)
		p = appendJSONString(p, c.id)
		p = append(p, `,"object":"chat.completion.chunk","created":`...)
		p = strconv.AppendInt(p, c.created, 10)
		p = append(p, `,"model":`...)
		p = appendJSONString(p, c.model)
		p = append(p, `,"choices":[{"index":`...)
		c.chunkPrefix = p
	}
	b := s.buf.AvailableBuffer()
	b = append(b, c.chunkPrefix...)
	b = strconv.AppendInt(b, int64(index), 10)
	b = append(b, `,"delta":{"content":`...)
	b = appendJSONString(b, text)
	b = append(b, `},"logprobs":null,"finish_reason":null}]}`+"\n\n"...)
	s.buf.Write(b)
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string the way encoding/json does without HTML
// escaping: quote, backslash and control characters escaped (\b \f \n \r \t by name, others as
// \u00XX), U+2028 and U+2029 as \u2028 and \u2029, invalid UTF-8 as \ufffd.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
