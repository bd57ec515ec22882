package bench

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestSSEReader(t *testing.T) {
	long := strings.Repeat("x", 200<<10)
	for _, tc := range []struct {
		name, in string
		want     []Event
	}{
		{"two events", "data: a\n\ndata: [DONE]\n\n", []Event{{Data: "a"}, {Data: "[DONE]"}}},
		{"CRLF", "data: a\r\n\r\ndata: b\r\n\r\n", []Event{{Data: "a"}, {Data: "b"}}},
		{"no space after colon", "data:a\n\n", []Event{{Data: "a"}}},
		{"only the first space is dropped", "data:  a\n\n", []Event{{Data: " a"}}},
		{"comments and pings skipped", ": ping\n\n: keep-alive\ndata: a\n\n", []Event{{Data: "a"}}},
		{"multi-line data", "data: {\"a\":\ndata: 1}\n\n", []Event{{Data: "{\"a\":\n1}"}}},
		{"event name and id", "event: error\nid: 7\nretry: 10\ndata: boom\n\ndata: next\n\n",
			[]Event{{Name: "error", Data: "boom"}, {Data: "next"}}},
		{"blank lines without data", "\n\n\ndata: a\n\n\n", []Event{{Data: "a"}}},
		{"last event without blank line", "data: a\n\ndata: [DONE]\n", []Event{{Data: "a"}, {Data: "[DONE]"}}},
		{"last line without newline", "data: a\n\ndata: [DONE]", []Event{{Data: "a"}, {Data: "[DONE]"}}},
		{"line longer than the buffer", "data: " + long + "\n\n", []Event{{Data: long}}},
		{"empty", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewSSEReader(strings.NewReader(tc.in))
			var got []Event
			for {
				ev, err := r.Next()
				if errors.Is(err, io.EOF) {
					break
				}
				require.NoError(t, err)
				require.False(t, ev.At.IsZero())
				ev.At = time.Time{} // compare without times
				got = append(got, ev)
			}
			require.Equal(t, tc.want, got)
		})
	}
}

type failingReader struct{ n int }

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n == 0 {
		f.n++
		return copy(p, "data: a\n\ndata: b"), nil
	}
	return 0, errors.New("connection reset")
}

func TestSSEReaderError(t *testing.T) {
	r := NewSSEReader(&failingReader{})
	ev, err := r.Next()
	require.NoError(t, err)
	require.Equal(t, "a", ev.Data)
	_, err = r.Next()
	require.ErrorContains(t, err, "connection reset")
}
