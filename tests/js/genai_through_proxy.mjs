// Calls keylease's Gemini-compatible proxy with the real @google/genai SDK: only the base URL
// and the API key (a keylease worker token) differ from calling Gemini.
//
//     node genai_through_proxy.mjs PROXY_URL TOKEN MODEL
import { GoogleGenAI } from "@google/genai";

const [url, token, model] = process.argv.slice(2);
const ai = new GoogleGenAI({ apiKey: token, httpOptions: { baseUrl: url } });

const answer = await ai.models.generateContent({ model, contents: "Hello from JavaScript" });
console.log(`generated: ${answer.text}`);

let streamed = "";
for await (const chunk of await ai.models.generateContentStream({
  model,
  contents: "Stream from JavaScript",
})) {
  streamed += chunk.text ?? "";
}
console.log(`streamed: ${streamed}`);
