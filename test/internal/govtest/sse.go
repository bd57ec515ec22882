package govtest

import (
	"bufio"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// SSEData reads a server-sent event stream to its end and returns its data lines, [DONE]
// included.
func SSEData(t testing.TB, r io.Reader) []string {
	t.Helper()
	var lines []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			lines = append(lines, line)
		}
	}
	require.NoError(t, sc.Err())
	return lines
}
