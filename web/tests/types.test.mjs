// The module as a package: every export of switchboard.js is declared in switchboard.d.ts, and
// package.json points at files that exist and are published. (tests/types/usage.ts is compiled by
// `tsc --strict` before these tests run: see `npm test`.)

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile, access } from "node:fs/promises";

const web = new URL("../", import.meta.url);

test("every export of switchboard.js is declared in switchboard.d.ts", async () => {
  const module = await import(new URL("switchboard.js", web));
  const declarations = await readFile(new URL("switchboard.d.ts", web), "utf8");
  const declared = new Set([...declarations.matchAll(/^export declare (?:const|class|function) (\w+)/gm)].map((m) => m[1]));
  const exported = Object.keys(module).sort();
  assert.ok(exported.length >= 2, `exports: ${exported}`);
  assert.deepEqual(exported, [...declared].sort());
  assert.equal(module.PROTOCOL, "switchboard.v1", "the declared literal type is the value");
});

test("package.json publishes the module and its types", async () => {
  const pkg = JSON.parse(await readFile(new URL("package.json", web), "utf8"));
  assert.equal(pkg.private, undefined, "publishable");
  assert.equal(pkg.type, "module");
  assert.equal(pkg.exports["."].default, "./switchboard.js");
  assert.equal(pkg.exports["."].types, pkg.types);
  for (const file of [pkg.main, pkg.types, ...pkg.files]) {
    await access(new URL(file, web));
  }
  assert.deepEqual([...pkg.files].sort(), ["switchboard.d.ts", "switchboard.js"]);
});
