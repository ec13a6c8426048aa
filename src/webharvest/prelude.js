// Web-Harvest's script objects, built on harvest's native __wh_* functions (see script.rs).
(function () {
  "use strict";
  const hidden = (o, k, v) => Object.defineProperty(o, k, { value: v, enumerable: false });

  // Java's List methods on the arrays scripts get from toList().
  const javaList = (a) => {
    hidden(a, "size", function () { return this.length; });
    hidden(a, "get", function (i) { return this[i]; });
    hidden(a, "isEmpty", function () { return this.length === 0; });
    hidden(a, "contains", function (x) { return this.some((y) => String(y) === String(x)); });
    return a;
  };

  // A Web-Harvest variable: a text or a list of texts.
  class Variable {
    constructor(items, isList) {
      hidden(this, "__items", items);
      hidden(this, "__list", isList);
    }
    toString() {
      return this.__list
        ? this.__items.filter((s) => s.length > 0).join("\n")
        : (this.__items[0] === undefined ? "" : this.__items[0]);
    }
    // A canonical number reads as a number (`i + 1`), anything else as its text.
    valueOf() {
      const s = this.toString();
      const n = Number(s);
      return s.length > 0 && String(n) === s ? n : s;
    }
    toList() {
      return javaList(this.__items.filter((s) => s.length > 0 || this.__list)
        .map((s) => new Variable([s], false)));
    }
    toArray() { return this.toList(); }
    size() { return this.__list ? this.__items.length : (this.toString().length > 0 ? 1 : 0); }
    isEmpty() { return this.__items.every((s) => s.length === 0); }
    toBoolean() {
      const s = this.toString().trim().toLowerCase();
      return s === "true" || s === "yes" || s === "1";
    }
    toInt() { return parseInt(this.toString().trim(), 10); }
    toLong() { return this.toInt(); }
    toDouble() { return parseFloat(this.toString().trim()); }
    getWrappedObject() { return this.__list ? this.__items.slice() : this.toString(); }
  }
  hidden(globalThis, "__wh_wrap", (items, isList) => new Variable(items, isList));

  // Script value -> null (empty), a string, or an array of strings (a list).
  const result = (v) => {
    if (v === undefined || v === null) return null;
    if (v instanceof Promise) throw new Error("a script cannot return a Promise: asynchronous code does not run here");
    if (v instanceof Variable) return v.__list ? v.__items.slice() : v.toString();
    if (Array.isArray(v)) return v.flatMap((x) => { const r = result(x); return r === null ? [] : r; });
    if (v instanceof Set) return result(Array.from(v));
    return String(v);
  };
  hidden(globalThis, "__wh_result", result);

  // Java's String methods BeanShell scripts call that JavaScript lacks.
  hidden(String.prototype, "equals", function (o) { return String(this) === String(o); });
  hidden(String.prototype, "equalsIgnoreCase", function (o) {
    return String(this).toLowerCase() === String(o).toLowerCase();
  });
  hidden(String.prototype, "contains", function (o) { return String(this).includes(String(o)); });
  hidden(String.prototype, "matches", function (re) { return new RegExp("^(?:" + re + ")$").test(this); });
  hidden(String.prototype, "isEmpty", function () { return this.length === 0; });

  const str = (x) => (x === undefined || x === null ? "" : String(x));
  globalThis.sys = {
    lf: "\n", cr: "\r", tab: "\t", space: " ", quot: "\"", apos: "'", backspace: "\b",
    fullUrl: (base, link) => __wh_fullUrl(str(base), str(link)),
    escapeXml: (s) => __wh_escapeXml(str(s)),
    datetime: (f) => __wh_datetime(str(f)),
    date: () => __wh_datetime("yyyyMMdd"),
    time: () => __wh_datetime("HHmmss"),
    getFilename: (p) => { const s = str(p); const i = Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\")); return i >= 0 && i < s.length - 1 ? s.substring(i + 1) : s; },
    isVariableDefined: (n) => __wh_isDefined(str(n)),
    getVar: (n) => {
      const items = __wh_getVarItems(str(n));
      return items === undefined || items === null ? null : new Variable(items, __wh_isList(str(n)));
    },
    defineVariable: (n, v, overwrite) => __wh_define(str(n), result(v), overwrite === undefined ? true : !!overwrite),
    error: (m) => { throw new Error(str(m)); },
  };
  globalThis.SetContextVar = (n, v) => __wh_setContext(str(n), result(v), true);
  globalThis.setContextVar = globalThis.SetContextVar;
  globalThis.print = (...a) => __wh_print(a.map(str).join(" "));
  globalThis.println = globalThis.print;

  const http = {
    statusCode: 0, statusText: "", charset: "", mimeType: "", contentLength: 0,
    headers: [], totalLength: 0, totalResponses: 0,
    getHeader(name) {
      const h = this.headers.find((p) => p.key.toLowerCase() === str(name).toLowerCase());
      return h ? h.value : null;
    },
    getHeaders(name) {
      return javaList(this.headers.filter((p) => p.key.toLowerCase() === str(name).toLowerCase()).map((p) => p.value));
    },
  };
  globalThis.http = http;
  hidden(globalThis, "__wh_setHttp", (numbers, texts, flat) => {
    [http.statusCode, http.contentLength, http.totalLength, http.totalResponses] = numbers;
    [http.statusText, http.charset, http.mimeType] = texts;
    const headers = [];
    for (let i = 0; i + 1 < flat.length; i += 2) {
      const key = flat[i], value = flat[i + 1];
      headers.push({ key, value, getKey: () => key, getValue: () => value });
    }
    http.headers = javaList(headers);
  });
})();
