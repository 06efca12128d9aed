// Ferry against real third-party software (run by scripts/node-tests.sh, with `ferry up` already
// running on tests/node/ferry.toml):
//  - oidc-provider: a trusted OIDC issuer (127.0.0.1:28090, client credentials, JWT access
//    tokens via resource indicators) whose tokens the Destination Service and the proxy accept,
//    and an untrusted one (127.0.0.1:28091) whose tokens they refuse;
//  - @sap/xssec: Ferry's own client-credentials and password tokens validate with
//    XsuaaService.createSecurityContext (JWKS from https://{uaadomain}/token_keys), tampered
//    ones do not.
// Environment: FERRY_ENV_FILE (the default-env.json ferry up wrote), NODE_EXTRA_CA_CERTS (its CA).
// Prints `N passed, N failed` last and exits non-zero on any failure.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import Provider from 'oidc-provider';
import xssec from '@sap/xssec';

const { XsuaaService } = xssec;

const TRUSTED_PORT = 28090;
const UNTRUSTED_PORT = 28091;
const ECHO_PORT = 28092;
const AUDIENCE = 'urn:ferry:api';
const USER = { name: 'node-user', password: 'node-user-password', email: 'node-user@example.org' };

const vcap = JSON.parse(fs.readFileSync(process.env.FERRY_ENV_FILE, 'utf8')).VCAP_SERVICES;
const dest = vcap.destination[0].credentials;
const conn = vcap.connectivity[0].credentials;
const xsuaa = vcap.xsuaa[0].credentials;

let passed = 0;
let failed = 0;
async function check(name, fn) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('timed out after 15 s')), 15000);
  });
  try {
    await Promise.race([fn(), timeout]);
    passed += 1;
    console.log(`ok - ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${name}\n  ${String(e?.stack ?? e).split('\n').join('\n  ')}`);
  } finally {
    clearTimeout(timer);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

/** An oidc-provider issuing RS256 JWT access tokens by client credentials, with its own key. */
async function startProvider(port) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: `node-${port}-${crypto.randomUUID()}`, alg: 'RS256', use: 'sig' };
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'node-client',
      client_secret: 'node-client-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_post',
    }],
    jwks: { keys: [jwk] },
    ttl: { ClientCredentials: 300 },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => AUDIENCE,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'api:read',
          audience: AUDIENCE,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  const server = await listen(http.createServer(provider.callback()), port);
  return { issuer, server };
}

async function providerToken(issuer) {
  const res = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'client_credentials',
      client_id: 'node-client',
      client_secret: 'node-client-secret',
      resource: AUDIENCE,
      scope: 'api:read',
    }),
  });
  const body = await res.json();
  assert(res.status === 200 && typeof body.access_token === 'string', `token from ${issuer}: ${res.status} ${JSON.stringify(body)}`);
  assert(body.access_token.split('.').length === 3, `not a JWT access token: ${body.access_token}`);
  return body.access_token;
}

/** The echo backend behind the connector: answers every request with what it saw. */
function startEcho() {
  const hits = [];
  const server = http.createServer((req, res) => {
    hits.push({ url: req.url, headers: req.headers });
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ url: req.url, headers: req.headers }));
  });
  return listen(server, ECHO_PORT).then(() => ({ server, hits }));
}

async function listDestinations(token) {
  const res = await fetch(`${dest.uri}/destination-configuration/v1/subaccountDestinations`, {
    headers: { authorization: `Bearer ${token}` },
  });
  // SAP's OpenAPI document gives this list's errors as plain text, its answer as JSON.
  const text = await res.text();
  const json = (res.headers.get('content-type') || '').startsWith('application/json');
  return { status: res.status, headers: res.headers, body: json ? JSON.parse(text) : text };
}

/** One absolute-form request through Ferry's HTTP proxy. */
function viaProxy(token, path) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: conn.onpremise_proxy_host,
      port: Number(conn.onpremise_proxy_http_port),
      method: 'GET',
      path: `http://echo.virtual:8080${path}`,
      headers: { host: 'echo.virtual:8080', 'proxy-authorization': `Bearer ${token}` },
      agent: false,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** SAP's SOCKS5 dialect up to the authentication status: `01 00` accepted, `01 01` refused. */
function socksAuth(token) {
  return new Promise((resolve, reject) => {
    const s = net.connect(Number(conn.onpremise_socks5_proxy_port), conn.onpremise_proxy_host);
    let buf = Buffer.alloc(0);
    s.on('error', reject);
    s.on('connect', () => s.write(Buffer.from([0x05, 0x01, 0x80])));
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length === 2) {
        const len = Buffer.alloc(4);
        len.writeUInt32BE(Buffer.byteLength(token));
        s.write(Buffer.concat([Buffer.from([0x01]), len, Buffer.from(token), Buffer.from([0x00])]));
      } else if (buf.length >= 4) {
        s.destroy();
        resolve([buf[2], buf[3]]);
      }
    });
  });
}

function tamper(jwt, mutate) {
  const [h, p, s] = jwt.split('.');
  const payload = JSON.parse(Buffer.from(p, 'base64url').toString());
  mutate(payload);
  return [h, Buffer.from(JSON.stringify(payload)).toString('base64url'), s].join('.');
}

async function rejects(promise, pattern) {
  try {
    await promise;
  } catch (e) {
    assert(!pattern || pattern.test(String(e?.message ?? e)), `rejected for another reason: ${e?.message ?? e}`);
    return e;
  }
  throw new Error('was accepted');
}

async function main() {
  const trusted = await startProvider(TRUSTED_PORT);
  const untrusted = await startProvider(UNTRUSTED_PORT);
  const echo = await startEcho();
  const servers = [trusted.server, untrusted.server, echo.server];

  let good;
  let bad;
  await check('oidc-provider issues JWT access tokens (trusted and untrusted provider)', async () => {
    good = await providerToken(trusted.issuer);
    bad = await providerToken(untrusted.issuer);
    const payload = JSON.parse(Buffer.from(good.split('.')[1], 'base64url').toString());
    assert(payload.iss === trusted.issuer && payload.aud === AUDIENCE, `claims: ${JSON.stringify(payload)}`);
  });

  await check('Destination Service accepts the trusted provider\'s token (200, subaccount of the trust entry)', async () => {
    const r = await listDestinations(good);
    assert(r.status === 200, `status ${r.status}: ${JSON.stringify(r.body)}`);
    assert(Array.isArray(r.body) && r.body.some((d) => d.Name === 'node-echo'), `list: ${JSON.stringify(r.body)}`);
  });

  await check('HTTP proxy accepts the trusted provider\'s token: the request reaches the echo backend', async () => {
    const before = echo.hits.length;
    const r = await viaProxy(good, '/hello?from=oidc');
    assert(r.status === 200, `status ${r.status}: ${r.body}`);
    assert(JSON.parse(r.body).url === '/hello?from=oidc', `echo: ${r.body}`);
    assert(echo.hits.length === before + 1, 'the backend saw no request');
    assert(!('proxy-authorization' in echo.hits.at(-1).headers), 'Proxy-Authorization reached the backend');
  });

  await check('SOCKS5 accepts the trusted provider\'s token (01 00)', async () => {
    const status = await socksAuth(good);
    assert(status[0] === 1 && status[1] === 0, `status ${status}`);
  });

  await check('Destination Service refuses the untrusted provider\'s token (401, reason, WWW-Authenticate)', async () => {
    const r = await listDestinations(bad);
    assert(r.status === 401, `status ${r.status}: ${JSON.stringify(r.body)}`);
    assert(/^Invalid bearer token: token /.test(r.body), `body: ${JSON.stringify(r.body)}`);
    assert(/^Bearer error="invalid_token", error_description="token /.test(r.headers.get('www-authenticate')), `header: ${r.headers.get('www-authenticate')}`);
  });

  await check('HTTP proxy refuses the untrusted provider\'s token (407) and the backend sees nothing', async () => {
    const before = echo.hits.length;
    const r = await viaProxy(bad, '/never');
    assert(r.status === 407, `status ${r.status}: ${r.body}`);
    assert(/^Proxy authentication failed: token /.test(r.body), `body: ${r.body}`);
    assert(echo.hits.length === before, 'the backend was reached');
  });

  await check('SOCKS5 refuses the untrusted provider\'s token (01 01)', async () => {
    const status = await socksAuth(bad);
    assert(status[0] === 1 && status[1] === 1, `status ${status}`);
  });

  await check('a trusted provider\'s token with a tampered payload is refused (401 and 407)', async () => {
    const forged = tamper(good, (p) => { p.client_id = 'someone-else'; });
    const r = await listDestinations(forged);
    assert(r.status === 401 && r.body === 'Invalid bearer token: token signature is invalid', JSON.stringify(r.body));
    assert((await viaProxy(forged, '/x')).status === 407, 'proxy accepted it');
  });

  const service = new XsuaaService(xsuaa);
  let ccToken;
  let userToken;
  await check('@sap/xssec validates Ferry\'s client-credentials token', async () => {
    ccToken = (await service.fetchClientCredentialsToken()).access_token;
    const ctx = await service.createSecurityContext(ccToken);
    assert(ctx.token.clientId === xsuaa.clientid, `client id ${ctx.token.clientId}`);
    assert(ctx.token.zid === xsuaa.tenantid, `zid ${ctx.token.zid}`);
    assert(ctx.getZoneId() === xsuaa.tenantid, `zone ${ctx.getZoneId()}`);
  });

  await check('@sap/xssec validates Ferry\'s user token (password grant)', async () => {
    userToken = (await service.fetchPasswordToken(USER.name, USER.password)).access_token;
    const ctx = await service.createSecurityContext(userToken);
    assert(ctx.getLogonName() === USER.name, `logon name ${ctx.getLogonName()}`);
    assert(ctx.getEmail() === USER.email, `email ${ctx.getEmail()}`);
    assert(ctx.checkLocalScope('Display'), `scopes ${JSON.stringify(ctx.token.scopes)}`);
  });

  await check('@sap/xssec refuses tampered Ferry tokens', async () => {
    await rejects(service.createSecurityContext(tamper(userToken, (p) => { p.user_name = 'admin'; })), /signature/i);
    const [h, p, s] = ccToken.split('.');
    const flipped = `${h}.${p}.${s.slice(0, -4)}${s.slice(-4) === 'AAAA' ? 'BBBB' : 'AAAA'}`;
    await rejects(service.createSecurityContext(flipped), /signature/i);
    // Not Ferry's key at all: the untrusted provider's token names a kid Ferry does not have.
    await rejects(new XsuaaService(xsuaa).createSecurityContext(bad));
  });

  await check('Ferry\'s own tokens are still accepted by its services', async () => {
    const r = await listDestinations(ccToken);
    assert(r.status === 200, `status ${r.status}: ${JSON.stringify(r.body)}`);
    const p = await viaProxy(userToken, '/own');
    assert(p.status === 200, `proxy status ${p.status}: ${p.body}`);
  });

  for (const s of servers) s.closeAllConnections?.();
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
}

await main().catch((e) => {
  failed += 1;
  console.log(`not ok - set-up\n  ${e?.stack ?? e}`);
});
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
