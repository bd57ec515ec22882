package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"time"
)

// Event is one server-sent event: its data lines joined with "\n", the event name when the
// server sent one, and when its last line arrived.
type Event struct {
	Name string
	Data string
	At   time.Time
}

// SSEReader reads server-sent events (the text/event-stream format) from a response body.
// Lines end in "\n" or "\r\n"; comments (lines starting with ':') and the id and retry fields
// are skipped; an event is dispatched at the blank line that ends it.
type SSEReader struct {
	r    *bufio.Reader
	now  func() time.Time
	data bytes.Buffer
	has  bool // whether the pending event has a data line
	name string
}

// NewSSEReader returns a reader of the events in r.
func NewSSEReader(r io.Reader) *SSEReader {
	return &SSEReader{r: bufio.NewReaderSize(r, 64<<10), now: time.Now}
}

// Next returns the next event. At the end of the input it returns io.EOF; an event whose
// closing blank line never came (the server closed the connection right after its last data
// line) is still returned first. Read errors are returned wrapped.
func (s *SSEReader) Next() (Event, error) {
	for {
		line, err := s.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A line longer than the buffer: gather the rest of it.
			long := append([]byte(nil), line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = s.r.ReadSlice('\n')
				long = append(long, line...)
			}
			line = long
		}
		if len(line) > 0 {
			if ev, ok := s.line(line); ok {
				return ev, nil
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if s.has {
					return s.dispatch(), nil
				}
				return Event{}, io.EOF
			}
			return Event{}, fmt.Errorf("bench: reading the event stream: %w", err)
		}
	}
}

// line takes one line of input; it returns an event when the line ends one.
func (s *SSEReader) line(line []byte) (Event, bool) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) == 0 {
		if !s.has {
			s.name = ""
			return Event{}, false
		}
		return s.dispatch(), true
	}
	if line[0] == ':' {
		return Event{}, false
	}
	field, value, found := bytes.Cut(line, []byte(":"))
	if found {
		value = bytes.TrimPrefix(value, []byte(" "))
	}
	switch string(field) {
	case "data":
		if s.has {
			s.data.WriteByte('\n')
		}
		s.data.Write(value)
		s.has = true
	case "event":
		s.name = string(value)
	}
	return Event{}, false
}

func (s *SSEReader) dispatch() Event {
	ev := Event{Name: s.name, Data: s.data.String(), At: s.now()}
	s.data.Reset()
	s.has = false
	s.name = ""
	return ev
}
