// The Cloud Connector web UI in a real browser (run by scripts/ui-tests.sh, with `ferry up`
// running on tests/ui/ferry.toml): headless Chromium from Debian, driven by playwright-core.
//  - first logon as Administrator/manage and the forced password change;
//  - adding a subaccount by pasting the authentication data of `ferry connector enroll`;
//  - a system mapping with a resource to an echo backend this script runs, a reachability
//    check, and a refused confirmation that keeps the mapping;
//  - an app request through Ferry's HTTP proxy, which then shows in the audit viewer and in the
//    monitoring charts;
//  - switching the logon to LDAP (slapd run by the script): a user of the sccadmin group logs on
//    and sees his role, a user in no group is refused, the file-based Administrator is inactive.
// A screenshot of every page goes to FERRY_SCREENSHOTS. Prints `N passed, N failed` last and
// exits non-zero on any failure (the first failed step skips the rest: they build on it).
// Environment: FERRY_UI_URL, FERRY_ENV_FILE (VCAP_SERVICES), FERRY_AUTH_DATA, FERRY_LOCATION,
// FERRY_SCREENSHOTS, CHROMIUM, NODE_EXTRA_CA_CERTS (Ferry's CA for the token service),
// FERRY_LDAP_PORT and FERRY_LDAP_SUFFIX (the directory).

import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.FERRY_UI_URL;
const LOCATION = process.env.FERRY_LOCATION;
const SHOTS = process.env.FERRY_SCREENSHOTS;
const NEW_PASSWORD = 'ui-test-password-1';
const vcap = JSON.parse(fs.readFileSync(process.env.FERRY_ENV_FILE, 'utf8')).VCAP_SERVICES;
const conn = vcap.connectivity[0].credentials;
const authData = fs.readFileSync(process.env.FERRY_AUTH_DATA, 'utf8');

let passed = 0;
let failed = 0;
let broken = false;
async function step(name, fn) {
  if (broken) {
    console.log(`skip - ${name}`);
    return;
  }
  try {
    await fn();
    passed += 1;
    console.log(`ok - ${name}`);
  } catch (e) {
    failed += 1;
    broken = true;
    console.log(`not ok - ${name}\n  ${String(e?.stack ?? e).split('\n').join('\n  ')}`);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

/** The echo backend behind the mapping. */
function startEcho() {
  const server = http.createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ url: req.url, method: req.method }));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

/** A client-credentials token of the connectivity service instance (as an app gets it). */
async function appToken() {
  const res = await fetch(`${conn.url ?? conn.token_service_url}/oauth/token`, {
    method: 'POST',
    headers: {
      'content-type': 'application/x-www-form-urlencoded',
      authorization: `Basic ${Buffer.from(`${conn.clientid}:${conn.clientsecret}`).toString('base64')}`,
    },
    body: new URLSearchParams({ grant_type: 'client_credentials' }),
  });
  const body = await res.json();
  assert(res.status === 200 && body.access_token, `token: ${res.status} ${JSON.stringify(body)}`);
  return body.access_token;
}

/** One absolute-form request through Ferry's HTTP proxy to the connector's location. */
function viaProxy(token, url) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: conn.onpremise_proxy_host,
      port: Number(conn.onpremise_proxy_http_port),
      method: 'GET',
      path: url,
      headers: {
        host: new URL(url).host,
        'proxy-authorization': `Bearer ${token}`,
        'sap-connectivity-scc-location_id': LOCATION,
      },
      agent: false,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Reloads `url` until `check(page)` holds (tunnels and audit lines arrive asynchronously). */
async function until(page, url, check, what) {
  for (let i = 0; i < 100; i += 1) {
    await page.goto(url);
    if (await check(page)) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`gave up waiting: ${what}`);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

/** The page's message and any field messages (so a failed step says what the UI said). */
async function flash(page) {
  return (await page.locator('.flash, .field-error').allTextContents()).join(' ');
}

async function main() {
  const echo = await startEcho();
  const echoPort = echo.address().port;
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ui-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run',
    ],
    // The UI's certificate comes from the connector's own CA (ui-ca.pem), which this fresh
    // profile does not trust.
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.setDefaultTimeout(15000);
  const sub = JSON.parse(authData).subaccount;

  try {
    await step('an anonymous visit lands on the logon page', async () => {
      await page.goto(`${BASE}/`);
      assert(page.url().endsWith('/ui/login'), `at ${page.url()}`);
      await shot(page, '01-login');
    });

    await step('first logon with Administrator/manage must change the password first', async () => {
      await page.fill('input[name=user]', 'Administrator');
      await page.fill('input[name=password]', 'manage');
      await page.click('button[type=submit]');
      await page.waitForURL('**/ui/password');
      await shot(page, '02-password-change');
      await page.goto(`${BASE}/ui/overview`);
      assert(page.url().endsWith('/ui/password'), 'a page opened before the password change');
      // Field messages first.
      await page.fill('input[name=old]', 'manage');
      await page.fill('input[name=new]', 'short');
      await page.fill('input[name=repeat]', 'short');
      await page.click('main button[type=submit]');
      assert((await page.textContent('.field-error')).includes('at least 8'), 'no message for a short password');
      await page.fill('input[name=old]', 'manage');
      await page.fill('input[name=new]', NEW_PASSWORD);
      await page.fill('input[name=repeat]', NEW_PASSWORD);
      await page.click('main button[type=submit]');
      await page.waitForURL('**/ui/login?changed=1');
      assert((await flash(page)).includes('Password changed'), await flash(page));
    });

    await step('the old password is refused, the new one logs on', async () => {
      await page.fill('input[name=user]', 'Administrator');
      await page.fill('input[name=password]', 'manage');
      await page.click('button[type=submit]');
      assert((await flash(page)).includes('Wrong user name or password'), await flash(page));
      await page.fill('input[name=user]', 'Administrator');
      await page.fill('input[name=password]', NEW_PASSWORD);
      await page.click('button[type=submit]');
      await page.waitForURL('**/ui/overview');
      await shot(page, '03-overview-empty');
    });

    await step('add a subaccount with the authentication data of `ferry connector enroll`', async () => {
      await page.goto(`${BASE}/ui/subaccounts`);
      await page.click('#add-subaccount button[type=submit]');
      // The browser's own check (required) keeps the empty form; paste the data.
      await page.fill('textarea[name=authenticationData]', authData);
      await page.fill('input[name=displayName]', 'UI test location');
      await page.click('#add-subaccount button[type=submit]');
      await page.waitForURL('**/ui/subaccounts');
      assert((await flash(page)).includes('Subaccount added'), await flash(page));
      await until(page, `${BASE}/ui/overview`, async (p) => (await p.textContent('tbody')).includes('Connected'),
        'the tunnel of the new subaccount');
      await shot(page, '04-overview-connected');
    });

    await step('audit level ALL for the subaccount', async () => {
      await page.goto(`${BASE}/ui/subaccounts`);
      const row = page.locator('tr', { hasText: sub });
      await row.locator('select[name=level]').selectOption('ALL');
      await row.getByRole('button', { name: 'Set' }).click();
      assert((await flash(page)).includes('set to ALL'), await flash(page));
      await shot(page, '05-subaccounts');
    });

    await step('add a system mapping (messages next to wrong fields first) and a resource', async () => {
      await page.goto(`${BASE}/ui/access`);
      await page.getByRole('link', { name: 'Add system mapping' }).click();
      await page.waitForURL('**/ui/access/mapping?**');
      await page.fill('input[name=virtualHost]', 'erp.virtual');
      await page.fill('input[name=virtualPort]', '70000');
      await page.fill('input[name=localHost]', '127.0.0.1');
      await page.fill('input[name=localPort]', String(echoPort));
      await page.click('#mapping-form button[type=submit]');
      const err = await page.locator('.field.invalid').textContent();
      assert(err.includes('Virtual port') && err.includes('between 1 and 65535'), `message: ${err}`);
      await shot(page, '06-mapping-form-invalid');
      await page.fill('input[name=virtualPort]', '8080');
      await page.click('#mapping-form button[type=submit]');
      await page.waitForURL('**/ui/access');
      assert((await flash(page)).includes('System mapping erp.virtual:8080 saved'), await flash(page));
      const mapping = page.locator('[data-mapping="erp.virtual:8080"]');
      await mapping.locator('input[name=path]').fill('/sap');
      await mapping.getByRole('button', { name: 'Add resource' }).click();
      assert((await flash(page)).includes('Resource /sap added'), await flash(page));
    });

    await step('check reachability of the internal host', async () => {
      await page.locator('[data-mapping="erp.virtual:8080"]').getByRole('button', { name: 'Check reachability' }).click();
      assert((await flash(page)).includes('is reachable'), await flash(page));
      await shot(page, '07-access-control');
    });

    await step('a destructive action asks first; declining keeps the mapping', async () => {
      let asked = '';
      page.once('dialog', (d) => { asked = d.message(); d.dismiss(); });
      await page.locator('[data-mapping="erp.virtual:8080"]').getByRole('button', { name: 'Delete mapping' }).click();
      await page.goto(`${BASE}/ui/access`);
      assert(asked.includes('Delete system mapping erp.virtual:8080'), `dialog: ${asked}`);
      assert(await page.locator('[data-mapping="erp.virtual:8080"]').count() === 1, 'the mapping was deleted');
    });

    await step('an app request through the proxy reaches the backend', async () => {
      const r = await viaProxy(await appToken(), 'http://erp.virtual:8080/sap/ui-test-probe');
      assert(r.status === 200, `status ${r.status}: ${r.body}`);
      assert(JSON.parse(r.body).url === '/sap/ui-test-probe', r.body);
    });

    await step('the request shows in the audit viewer; the filtered CSV downloads', async () => {
      await until(page, `${BASE}/ui/audit?kind=allowed&q=ui-test-probe`,
        async (p) => (await p.textContent('table.audit')).includes('/sap/ui-test-probe'), 'the audit line');
      await shot(page, '08-audit-log');
      const [download] = await Promise.all([page.waitForEvent('download'), page.click('#audit-download')]);
      const csv = fs.readFileSync(await download.path(), 'utf8');
      assert(csv.startsWith('timestamp,event,') && csv.includes('/sap/ui-test-probe'), csv);
    });

    await step('the monitoring charts show the request, its bytes and latency', async () => {
      await page.goto(`${BASE}/ui/monitoring`);
      for (const id of ['chart-requests', 'chart-bytes', 'chart-latency']) {
        const total = Number(await page.getAttribute(`#${id}`, 'data-total'));
        assert(total > 0, `${id} total ${total}`);
      }
      assert(await page.locator('#chart-requests circle').count() > 0, 'no point drawn');
      await shot(page, '09-monitoring');
    });

    await step('the remaining pages render', async () => {
      for (const [name, url] of [['10-principal-propagation', '/ui/principal-propagation'],
        ['11-high-availability', '/ui/ha'], ['12-backup', '/ui/backup']]) {
        const resp = await page.goto(`${BASE}${url}`);
        assert(resp.status() === 200, `${url}: ${resp.status()}`);
        await shot(page, name);
      }
    });

    await step('logout ends the session', async () => {
      await page.getByRole('button', { name: 'Log out' }).click();
      await page.waitForURL('**/ui/login');
      await page.goto(`${BASE}/ui/overview`);
      assert(page.url().endsWith('/ui/login'), `at ${page.url()}`);
    });

    const suffix = process.env.FERRY_LDAP_SUFFIX;
    async function logon(user, password) {
      await page.goto(`${BASE}/ui/login`);
      await page.fill('input[name=user]', user);
      await page.fill('input[name=password]', password);
      await page.click('button[type=submit]');
    }

    await step('switch the logon to LDAP through the REST API', async () => {
      const auth = `Basic ${Buffer.from(`Administrator:${NEW_PASSWORD}`).toString('base64')}`;
      const resp = await context.request.put(`${BASE}/api/v1/configuration/connector/authentication/ldap`, {
        headers: { authorization: auth },
        data: {
          enable: true,
          configuration: `userBase="ou=people,${suffix}" userSearch="(uid={0})" `
            + `roleBase="ou=groups,${suffix}" roleName="cn" roleSearch="(member={0})"`,
          hosts: [{ host: '127.0.0.1', port: Number(process.env.FERRY_LDAP_PORT) }],
          user: `cn=reader,${suffix}`,
          password: 'reader-secret-ui',
        },
      });
      assert(resp.status() === 204, `PUT ldap: ${resp.status()} ${await resp.text()}`);
      await context.clearCookies();
    });

    await step('an LDAP user of the sccadmin group logs on and sees his role', async () => {
      await logon('anna', 'wrong-password');
      assert((await flash(page)).includes('Wrong user name or password'), await flash(page));
      await logon('anna', 'anna-ldap-pw');
      await page.waitForURL('**/ui/overview');
      const who = await page.textContent('.user');
      assert(who.includes('anna') && who.includes('sccadmin'), who);
      await shot(page, '13-ldap-admin');
      await page.getByRole('button', { name: 'Log out' }).click();
      await page.waitForURL('**/ui/login');
    });

    await step('an LDAP user without a role is refused; the file-based Administrator is inactive', async () => {
      await logon('nick', 'nick-ldap-pw');
      assert((await flash(page)).includes("none of the connector's roles"), await flash(page));
      await shot(page, '14-ldap-no-role');
      await page.goto(`${BASE}/ui/overview`);
      assert(page.url().endsWith('/ui/login'), `at ${page.url()}`);
      await logon('Administrator', NEW_PASSWORD);
      assert((await flash(page)).includes('Wrong user name or password'), await flash(page));
    });
  } finally {
    await context.close();
    echo.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

await main().catch((e) => {
  failed += 1;
  console.log(`not ok - ${String(e?.stack ?? e)}`);
});
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
