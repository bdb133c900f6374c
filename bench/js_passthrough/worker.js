// The minimal pass-through Worker that Ferry is benchmarked against (bench/transfer.py): the
// approach of Cloudflare's D1 backup example, one fetch whose body goes straight into one R2 put.
// POST /copy?src=<url>&key=<key> copies; its Authorization header, if any, goes to the source.
// GET /?key=<key> streams an object back, only so the benchmark can check what was stored.
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const key = url.searchParams.get("key");
    if (request.method === "GET") {
      const obj = key && (await env.BUCKET.get(key));
      return obj ? new Response(obj.body) : new Response("not found", { status: 404 });
    }
    const auth = request.headers.get("authorization");
    const r = await fetch(url.searchParams.get("src"), { headers: auth ? { authorization: auth } : {} });
    if (!r.ok) return new Response(`source answered ${r.status}`, { status: 502 });
    const obj = await env.BUCKET.put(key, r.body);
    return Response.json({ key: obj.key, size: obj.size });
  },
};
