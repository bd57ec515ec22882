package atomicfile

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestWriteFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := filepath.Join(dir, "f.json")
	require.NoError(t, WriteFile(p, []byte("one\n"), 0o600))
	require.NoError(t, WriteFile(p, []byte("two\n"), 0o644))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	require.Equal(t, "two\n", string(b))
	st, err := os.Stat(p)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o644), st.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1, "no temporary file left over")

	err = WriteFile(filepath.Join(dir, "no", "such", "dir"), nil, 0o644)
	require.ErrorIs(t, err, os.ErrNotExist)
	require.ErrorContains(t, err, "atomic write "+filepath.Join(dir, "no", "such", "dir"))
}
