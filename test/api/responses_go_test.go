package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"github.com/stretchr/testify/require"
)

// TestResponsesOpenAIGo drives /v1/responses through openai-go: Responses.New, NewStreaming
// accumulated to the same text and tool call, and a refused field.
func TestResponsesOpenAIGo(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		client := openai.NewClient(option.WithBaseURL(s.URL+"/v1"), option.WithAPIKey(apiKey), option.WithMaxRetries(0))
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
		defer cancel()

		// stream runs params streamed: the text of its deltas, the arguments of its
		// function-call deltas and the response of its last event, checking the sequence numbers.
		stream := func(params responses.ResponseNewParams) (text, args string, final *responses.Response) {
			st := client.Responses.NewStreaming(ctx, params)
			var tb, ab strings.Builder
			seq := int64(0)
			for st.Next() {
				ev := st.Current()
				require.Equal(t, seq, ev.SequenceNumber, "event %s", ev.Type)
				seq++
				switch ev.Type {
				case "response.output_text.delta":
					tb.WriteString(ev.Delta)
				case "response.function_call_arguments.delta":
					ab.WriteString(ev.Delta)
				case "response.completed", "response.incomplete":
					r := ev.Response
					final = &r
				}
			}
			require.NoError(t, st.Err())
			require.NotNil(t, final, "no response.completed")
			return tb.String(), ab.String(), final
		}

		t.Run("text", func(t *testing.T) {
			params := responses.ResponseNewParams{
				Model:           model,
				Input:           responses.ResponseNewParamsInputUnion{OfString: openai.String("What is the capital of France?")},
				Instructions:    openai.String("You are a helpful assistant."),
				MaxOutputTokens: openai.Int(16),
				Temperature:     openai.Float(0),
			}
			whole, err := client.Responses.New(ctx, params)
			require.NoError(t, err)
			require.True(t, strings.HasPrefix(whole.ID, "resp_"), whole.ID)
			require.NotEmpty(t, whole.OutputText())
			require.Positive(t, whole.Usage.OutputTokens)
			text, _, final := stream(params)
			require.Equal(t, whole.OutputText(), text)
			require.Equal(t, whole.OutputText(), final.OutputText())
			require.Equal(t, whole.Status, final.Status)
		})

		t.Run("forced call", func(t *testing.T) {
			params := responses.ResponseNewParams{
				Model: model,
				Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("What is the weather in Paris?")},
				Tools: []responses.ToolUnionParam{responses.ToolParamOfFunction("get_weather", map[string]any{
					"type":                 "object",
					"properties":           map[string]any{"city": map[string]any{"type": "string", "maxLength": 16}},
					"required":             []string{"city"},
					"additionalProperties": false,
				}, true)},
				ToolChoice:      responses.ResponseNewParamsToolChoiceUnion{OfFunctionTool: &responses.ToolChoiceFunctionParam{Name: "get_weather"}},
				MaxOutputTokens: openai.Int(48),
				Temperature:     openai.Float(0),
			}
			whole, err := client.Responses.New(ctx, params)
			require.NoError(t, err)
			require.Len(t, whole.Output, 1)
			call := whole.Output[0].AsFunctionCall()
			require.Equal(t, "get_weather", call.Name)
			var args map[string]any
			require.NoError(t, json.Unmarshal([]byte(call.Arguments), &args), call.Arguments)
			require.IsType(t, "", args["city"])
			_, streamed, final := stream(params)
			require.Equal(t, call.Arguments, streamed)
			require.Equal(t, call.Arguments, final.Output[0].AsFunctionCall().Arguments)
		})

		t.Run("refused", func(t *testing.T) {
			_, err := client.Responses.New(ctx, responses.ResponseNewParams{
				Model: model,
				Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("hi")},
				Store: openai.Bool(true),
			})
			var apiErr *openai.Error
			require.True(t, errors.As(err, &apiErr), "err %v", err)
			require.Equal(t, http.StatusBadRequest, apiErr.StatusCode)
			require.Contains(t, apiErr.RawJSON(), `"param":"store"`)
		})
	})
}
